"""``NpuFusedRMSprop``: torch.optim.RMSprop's results, one compiled kernel per bucket."""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype

from ._buckets import GroupLayout
from ._compile import BACKENDS, StepKey, get_bucket_step
from ._dump import bucket_context, resolve_dump_dir
from ._torchair import MODES as NPU_MODES
from ._npu import npu_status, require_torchair
from ._ownership import local_tensors
from ._state import TrackedState, track
from ._traced import init_group_for_dynamo, traced_step, traced_zero_grad
from .functional import check_options, rmsprop_step

__all__ = ["NpuFusedRMSprop"]

#: The values the compiled step reads at run time, in the order of its hyper tensor.
_HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum", "loss_scale")

_GRAD = operator.attrgetter("grad")

#: Options beyond torch.optim.RMSprop's, with the defaults that keep its exact update.
#: They enter a param group only when not at their default, so a default optimizer's
#: param_groups (and printing) are torch.optim.RMSprop's.
VARIANT_DEFAULTS: dict[str, Any] = {
    "eps_in_sqrt": False,
    "initial_square_avg": 0.0,
    "lr_in_momentum": False,
    "decoupled_weight_decay": False,
    "nesterov": False,
    "bias_correction": False,
    "loss_scale": 1.0,
}


def _validate_hyperparameters(lr, alpha, eps, weight_decay, momentum) -> None:
    """torch.optim.RMSprop's checks, with its messages."""
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}. Choose one of {', '.join(map(repr, choices))}")


def _hyper_dtype(device: torch.device) -> torch.dtype:
    # float64 reproduces torch's Python-float arithmetic (1 - alpha, -lr) exactly; the
    # Ascend graph engines handle float32 scalars best.
    return torch.float32 if device.type == "npu" else torch.float64


class _HyperTensor:
    """One bucket's ``[lr, alpha, eps, weight_decay, momentum, loss_scale, step]`` in one
    1-D tensor on the bucket's device (see Note [hyperparameters in one 1-D tensor] in
    ``_compile.py``), refreshed before each step without recompiling anything."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(len(_HYPERPARAMETERS) + 1, dtype=_hyper_dtype(device), device=device)
        self._seen: tuple | None = None

    def refresh(self, values: tuple) -> Tensor:
        if any(isinstance(v, Tensor) for v in values):
            for i, v in enumerate(values):
                self.tensor[i].copy_(v.detach().reshape(()) if isinstance(v, Tensor) else v)
            self._seen = None
        elif values != self._seen:
            staged = torch.tensor(values, dtype=self.tensor.dtype)
            if self.tensor.device.type != "cpu":  # no host synchronisation
                staged = staged.pin_memory()
            self.tensor.copy_(staged, non_blocking=True)
            self._seen = values
        return self.tensor


class NpuFusedRMSprop(Optimizer):
    r"""RMSprop with the whole step fused and compiled: a drop-in for
    ``torch.optim.RMSprop`` and ``torch_npu.optim.NpuFusedRMSprop``.

    With :math:`\gamma` = ``lr``, :math:`\alpha` = ``alpha``, :math:`\epsilon` = ``eps``,
    :math:`\lambda` = ``weight_decay`` and :math:`\mu` = ``momentum``, each step does, per
    parameter :math:`\theta` with gradient :math:`g`:

    .. math::

        \begin{aligned}
        g &\leftarrow g + \lambda\theta, \qquad
        v \leftarrow \alpha v + (1-\alpha) g^2 \\
        \bar g &\leftarrow \alpha \bar g + (1-\alpha) g, \qquad
        d \leftarrow \sqrt{v - \bar g^2} + \epsilon
            \quad\text{(centered; otherwise } d \leftarrow \sqrt{v} + \epsilon) \\
        b &\leftarrow \mu b + g/d, \qquad \theta \leftarrow \theta - \gamma b
            \quad\text{(if } \mu > 0\text{; otherwise } \theta \leftarrow \theta - \gamma g/d)
        \end{aligned}

    exactly as ``torch.optim.RMSprop`` (``maximize`` negates :math:`g` first). The math
    is :func:`~npu_optim_compile.rmsprop_step`.

    How it is fast: the parameters of each (param group, device, dtype) are gathered
    into one flat buffer, and so are their grads and each state buffer; the tensors you
    hold (``p``, ``p.grad``, ``optimizer.state[p]``) become views of those buffers. The
    update of a whole bucket is one compiled kernel. Re-allocated params or grads
    (``p.data = ...``, ``model.to()``, a new ``.grad`` after
    ``zero_grad(set_to_none=True)``, a param whose first grad arrives late) are detected
    and gathered again, never silently dropped.

    Args:
        params: parameters or param groups, as for any ``torch.optim.Optimizer``.
        lr: learning rate :math:`\gamma` (a float or a 1-element tensor). Default 1e-2.
        alpha: smoothing constant :math:`\alpha`. Default 0.99.
        eps: :math:`\epsilon`, added outside the square root. Default 1e-8.
        weight_decay: L2 penalty :math:`\lambda`. Default 0.
        momentum: :math:`\mu`. Default 0.
        centered: normalise by an estimate of the variance of the gradient.
        maximize: maximise the objective instead of minimising it.
        backend: ``"auto"`` (inductor on CPU/CUDA, torchair on an Ascend NPU),
            ``"inductor"``, ``"torchair"`` or ``"eager"`` (no compilation: the functional
            step on the flat buffers, for debugging).
        npu_mode: torchair's mode: ``"max-autotune"`` (default: a GE graph, fused and
            memory-planned by CANN), ``"npugraph_ex"`` or ``"reduce-overhead"`` (ACL-graph
            capture and replay of eager NPU kernels; all step inputs are marked static,
            so a replay copies nothing).
        dump_dir: write each compiled graph's files there (see ``_dump.py``; also the
            environment variable ``NPU_OPTIM_COMPILE_DUMP_DIR``).

    Variants (keyword-only; the defaults keep torch.optim.RMSprop's exact update, and
    every combination keeps one fused kernel per bucket; formulas in
    :func:`~npu_optim_compile.rmsprop_step`):

    Args:
        eps_in_sqrt: :math:`\sqrt{v + \epsilon}` (TensorFlow, Keras, timm, MindSpore,
            optax) instead of :math:`\sqrt{v} + \epsilon`.
        initial_square_avg: the mean square :math:`v` starts here (1 in TensorFlow and
            MindSpore, 0 in PyTorch).
        lr_in_momentum: :math:`b \leftarrow \mu b + \gamma g/d`, :math:`\theta
            \leftarrow \theta - b` (TensorFlow, timm, MindSpore, optax); the stored
            ``momentum_buffer`` is then lr-scaled. Differs from the default only when
            the learning rate changes.
        decoupled_weight_decay: :math:`\theta \leftarrow \theta(1 - \gamma\lambda)`
            before the update instead of adding :math:`\lambda\theta` to the gradient.
        nesterov: Nesterov momentum (optax's); needs ``momentum > 0``.
        bias_correction: divide :math:`v` (and :math:`\bar g`) by
            :math:`1 - \alpha^t` (optax's ``bias_correction``).
        loss_scale: the gradients are divided by it (MindSpore's fixed loss scale).

    Hyperparameters live in a tensor inside the compiled graph: changing them, with an
    LR scheduler or by hand, never recompiles. The state_dict has torch.optim.RMSprop's
    format, and each loads into the other.

    Mixed precision: ``torch.amp.GradScaler`` works as with any optimizer. Because this
    class sets ``_step_supports_amp_scaling``, the scaler passes its scale and its
    found-inf flag as tensors: the unscale and the skip of an overflowing step happen
    inside the compiled step, with no ``.item()`` synchronisation.

    Distributed: under ``DistributedDataParallel``, ``ZeroRedundancyOptimizer(
    optimizer_class=NpuFusedRMSprop)`` and FSDP2 (``fully_shard``), storage the engine
    lays out is never re-pointed (``_ownership.py``): params in ZeRO's buckets and DTensor
    params are updated in place per tensor (DTensors through their local shards, with
    DTensor state, as torch.optim.RMSprop keeps it), and grads in DDP's buckets
    (``gradient_as_bucket_view=True``) are copied into the flat grad buffer.

    Inside a user's ``torch.compile`` (a whole train step; see
    :func:`~npu_optim_compile.compile_train_step`), ``step()`` and ``zero_grad()`` are
    traced with no graph break, as per-tensor foreach ops (``_traced.py``); the first
    trace turns a float ``lr`` into a 0-d tensor, so LR schedulers never recompile.
    """

    # torch.amp.GradScaler then hands us grad_scale / found_inf tensors instead of
    # unscaling and checking with .item() itself: both happen inside the compiled step.
    _step_supports_amp_scaling = True

    # Run by Dynamo in Python when step() is traced (Note [Dynamo and _init_group]).
    _init_group = init_group_for_dynamo

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        *,
        maximize: bool = False,
        eps_in_sqrt: bool = False,
        initial_square_avg: float = 0.0,
        lr_in_momentum: bool = False,
        decoupled_weight_decay: bool = False,
        nesterov: bool = False,
        bias_correction: bool = False,
        loss_scale: float = 1.0,
        backend: str = "auto",
        npu_mode: str = "max-autotune",
        dump_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        _validate_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        _check_choice("backend", backend, BACKENDS)
        _check_choice("npu_mode", npu_mode, NPU_MODES)
        check_options(
            momentum_buffers=momentum > 0,
            nesterov=nesterov,
            loss_scale=loss_scale,
            initial_square_avg=initial_square_avg,
        )
        variants = dict(
            eps_in_sqrt=eps_in_sqrt,
            initial_square_avg=initial_square_avg,
            lr_in_momentum=lr_in_momentum,
            decoupled_weight_decay=decoupled_weight_decay,
            nesterov=nesterov,
            bias_correction=bias_correction,
            loss_scale=loss_scale,
        )
        if backend == "torchair":  # fail now, saying what is missing, not at the first step
            require_torchair("NpuFusedRMSprop(backend='torchair')")
            status = npu_status()
            if not status.available:
                raise RuntimeError(f"NpuFusedRMSprop(backend='torchair') needs an Ascend NPU: {status.reason}")
        self.backend = backend
        self.npu_mode = npu_mode
        self.dump_dir = resolve_dump_dir(dump_dir)
        self._layouts: dict[int, GroupLayout] = {}
        # Same keys as torch.optim.RMSprop, so state_dicts load both ways.
        defaults = dict(
            lr=lr,
            momentum=momentum,
            alpha=alpha,
            eps=eps,
            centered=centered,
            weight_decay=weight_decay,
            capturable=False,
            foreach=None,
            maximize=maximize,
            differentiable=False,
        )
        defaults.update({k: v for k, v in variants.items() if v != VARIANT_DEFAULTS[k]})
        super().__init__(params, defaults)
        self.state = track(self.state)

    @classmethod
    def from_mindspore(cls, params: ParamsT, *args: Any, **kwargs: Any) -> NpuFusedRMSprop:
        """``mindspore.nn.RMSProp``'s update with its argument names and defaults: see
        :func:`npu_optim_compile.presets.from_mindspore`."""
        from .presets import from_mindspore  # presets builds on this module

        return from_mindspore(params, *args, optimizer_class=cls, **kwargs)

    # -- torch.optim.Optimizer API -------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not (p.is_floating_point() or p.is_complex()):
                self.param_groups.pop()
                raise TypeError(
                    f"NpuFusedRMSprop can only optimize floating point or complex "
                    f"parameters, but got a parameter of dtype {p.dtype}"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also reached from load_state_dict, whose loaded tensors replace our views:
        # mark the layouts stale, so the next step gathers the loaded values and frees
        # the old buffers.
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("npu_mode", "max-autotune")
        self.__dict__.setdefault("dump_dir", "")
        self.__dict__.setdefault("_layouts", {})
        self.state = track(self.state)
        for layout in self._layouts.values():
            layout.stale = True
        for state in self.state.values():  # old checkpoints: a float step, as torch upgrades
            if "step" in state and not torch.is_tensor(state["step"]):
                state["step"] = torch.tensor(float(state["step"]), dtype=_get_scalar_dtype())
        # A loaded group keeps only the keys it was saved with (torch's format has none
        # of our variants): fill the rest from this optimizer's construction, so loading
        # never changes the algorithm.
        for group in self.param_groups:
            for key, default in self.defaults.items():
                group.setdefault(key, default)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(backend=self.backend, npu_mode=self.npu_mode, dump_dir=self.dump_dir)
        return state

    def state_dict(self) -> dict[str, Any]:
        """torch.optim.RMSprop's format, with plain dicts (loadable with
        ``torch.load(weights_only=True)``)."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) for k, v in state_dict["state"].items()}
        return state_dict

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
            grad_scaler (keyword, optional): passed by GradScalers that follow the legacy
                ``_step_supports_amp_scaling`` contract (torch_npu's
                ``torch_npu.npu.amp.GradScaler``): the grads are unscaled through it and
                an overflowing step is skipped inside the compiled step.
                ``torch.amp.GradScaler`` instead sets ``grad_scale`` / ``found_inf``.
        """
        grad_scaler = kwargs.pop("grad_scaler", None)
        if kwargs:
            raise TypeError(f"step() got unexpected keyword arguments {sorted(kwargs)}")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scaler is not None:
            self._adopt_legacy_scaler(grad_scaler)
        try:
            if torch.compiler.is_compiling():  # inside a user's torch.compile: _traced.py
                traced_step(self)
            else:
                for index, group in enumerate(self.param_groups):
                    self._step_group(index, group)
        finally:
            if grad_scaler is not None:
                self.__dict__.pop("found_inf", None)
                self.__dict__.pop("grad_scale", None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        # Dynamo skips torch.optim.Optimizer.zero_grad (a graph break in a compiled train
        # step); inside torch.compile run a traceable equivalent instead.
        if torch.compiler.is_compiling():
            traced_zero_grad(self, set_to_none)
        else:
            super().zero_grad(set_to_none)

    def _adopt_legacy_scaler(self, scaler) -> None:
        """The legacy contract, done as the current one: the scaler checks the grads for
        inf/NaN (which records what ``scaler.update()`` reads) and the unscale and the skip
        happen inside the compiled step. fp16 grads are fine here (``unscale_`` refuses
        them for non-fused optimizers)."""
        state = scaler._per_optimizer_states[id(self)]
        if state["stage"].name == "READY":
            check = getattr(scaler, "_check_inf_per_device", None)
            if check is not None:
                check(self)
                self.grad_scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
            else:  # a scaler without the check: let it unscale the grads itself
                scaler.unscale_(self)
        found = list(state["found_inf_per_device"].values())
        self.found_inf = sum(t.to(found[0].device, non_blocking=True) for t in found[1:]) + found[0]

    # -- torch_npu's tensor-fusion API ----------------------------------------------

    def _layouts_now(self) -> list[GroupLayout]:
        layouts = (self._prepare_group(i, g) for i, g in enumerate(self.param_groups))
        return [layout for layout in layouts if layout is not None]

    def describe_buckets(self) -> list[dict[str, Any]]:
        """One entry per bucket of the last step: group, device, dtype, tensors, elements."""
        return [
            {
                "group": index,
                "device": str(b.device),
                "dtype": str(b.param.dtype).removeprefix("torch."),
                "tensors": len(b.params),
                "elements": b.param.numel(),
                "state": list(b.state),
                "graph": b.graph,
            }
            for index, layout in sorted(self._layouts.items())
            for b in layout.buckets
        ]

    def get_combined_params(self) -> list[Tensor]:
        """The flat param buffers, one per (param group, device, dtype) bucket, of the
        params that have a grad now (torch_npu's ``get_combined_params``; torch_npu
        combines per dtype across groups). Each such param is a view of one of them, except
        params on the per-tensor path (memory owned elsewhere, non-dense, zero-size)."""
        return [b.param for layout in self._layouts_now() for b in layout.buckets]

    def get_combined_grads(self) -> list[Tensor]:
        """The flat grad buffers, bucket by bucket (torch_npu's ``get_combined_grads``).
        Grads that autograd re-allocated are gathered into them first."""
        return [b.grad for layout in self._layouts_now() for b in layout.buckets]

    @torch.no_grad()
    def clip_grad_norm_fused_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the grads of all groups to a total norm of ``max_norm``, in place, on the
        flat buffers: ``torch.nn.utils.clip_grad_norm_``'s result with one norm and one
        scale per bucket. Returns the total norm before clipping."""
        grads = []
        for layout in self._layouts_now():
            grads += [b.grad for b in layout.buckets] + [p.grad for p in layout.loose]
        if not grads:
            return torch.tensor(0.0)
        norm_type = float(norm_type)
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total

    # -- internals -------------------------------------------------------------------

    def _layout(self, index: int, params: list[Tensor], roles: tuple, options: dict) -> GroupLayout:
        layout = self._layouts.get(index)
        if (
            layout is not None
            and not layout.stale
            and layout.roles == roles
            and isinstance(self.state, TrackedState)
            and self.state.version == layout.state_version
            and layout.matches(params)
        ):
            try:
                if layout.sync_grads(params):
                    return layout
            except RuntimeError:  # a grad without storage (sparse): checked below
                pass
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("NpuFusedRMSprop does not support sparse gradients")
        self.state = track(self.state)  # replaced by the user (opt.state = ...)?
        layout = GroupLayout.build(
            params,
            self.state,
            roles,
            layout,
            initial_square_avg=options["initial_square_avg"],
            split_by_step=options["bias_correction"],
        )
        self._layouts[index] = layout
        # Building changed the state (views, new entries): other groups' layouts are
        # still valid, so every layout records the version as of now.
        for other in self._layouts.values():
            other.state_version = self.state.version
        return layout

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "torchair" if device.type == "npu" else "inductor"
        return self.backend

    def _group_options(self, group: dict) -> dict[str, Any]:
        """The step options of a group: torch's keys plus the variants (their defaults
        where the group does not set them). Subclasses map their own keys here."""
        options = {key: group.get(key, default) for key, default in VARIANT_DEFAULTS.items()}
        options["lr_scaled_decay"] = True
        return options

    def _prepare_group(self, index: int, group: dict) -> GroupLayout | None:
        """Make group ``index``'s buckets current (gathering again what moved).

        The common case costs three C-level passes over the group: every param still
        has the very grad object it had after the last step (our flat-buffer view, or
        None), every param still lives where it did, and ``optimizer.state`` is
        unchanged. Anything else takes the full check, which re-gathers what moved.
        """
        gparams = group["params"]
        grads = list(map(_GRAD, gparams))
        roles = ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + (
            ("momentum_buffer",) if group["momentum"] > 0 else ()
        )
        layout = self._layouts.get(index)
        if layout is not None and layout.unchanged(self.state, roles, gparams, grads):
            return layout
        params = [p for p, g in zip(gparams, grads) if g is not None]
        if not params:
            return None
        layout = self._layout(index, params, roles, self._group_options(group))
        layout.remember(self.state, gparams)
        return layout

    def _step_group(self, index: int, group: dict) -> None:
        layout = self._prepare_group(index, group)
        if layout is None:
            return
        options = self._group_options(group)
        centered = bool(group["centered"])
        use_momentum = group["momentum"] > 0
        # AMP: torch.amp.GradScaler sets these tensors because _step_supports_amp_scaling.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        flags = {
            "centered": centered,
            "maximize": bool(group["maximize"]),
            "momentum": use_momentum,
            "weight_decay": isinstance(group["weight_decay"], Tensor) or group["weight_decay"] != 0,
            "eps_in_sqrt": options["eps_in_sqrt"],
            "lr_in_momentum": options["lr_in_momentum"],
            "decoupled_weight_decay": options["decoupled_weight_decay"],
            "lr_unscaled_decay": not options["lr_scaled_decay"],
            "nesterov": options["nesterov"],
            "bias_correction": options["bias_correction"],
            "loss_scale": isinstance(options["loss_scale"], Tensor) or options["loss_scale"] != 1,
            "grad_scale": grad_scale is not None,
            "found_inf": found_inf is not None,
        }
        flags = frozenset(name for name, on in flags.items() if on)
        values = tuple(group[name] for name in _HYPERPARAMETERS[:5]) + (options["loss_scale"],)

        for bucket in layout.buckets:
            bucket.steps.add_(1)
            skip = None if found_inf is None else found_inf.to(bucket.device, non_blocking=True)
            if skip is not None:
                bucket.steps.sub_(skip)
            if bucket.hyper is None:
                bucket.hyper = _HyperTensor(bucket.device)
            hyper = bucket.hyper.refresh(values + (0.0,))
            if "bias_correction" in flags:  # the bucket's step count, copied on the device
                hyper[-1].copy_(bucket.steps[0])
            scale = None if grad_scale is None else grad_scale.to(bucket.device, non_blocking=True)
            step = self._bucket_step(bucket, flags)
            if self.dump_dir:
                with bucket_context(self.describe_buckets()):
                    step(*bucket.step_args, hyper, scale, skip)
            else:
                step(*bucket.step_args, hyper, scale, skip)
            # The step wrote to the flat buffer, not through `p`: tell autograd, so a graph
            # that saved a param before the step still fails on backward, as with torch.
            torch.autograd.graph.increment_version(bucket.params)

        if layout.loose:  # params that cannot be views of a flat buffer: plain foreach
            self._step_loose(layout.loose, group, options, grad_scale, found_inf)
            torch.autograd.graph.increment_version(layout.loose)

    def _bucket_step(self, bucket, flags: frozenset[str]):
        """The compiled step for ``bucket`` and these flags, kept on the bucket while the
        flags, backend, mode and dump folder stay the same (the common case: every step)."""
        backend = self._resolve_backend(bucket.device)
        mode = self.npu_mode if backend == "torchair" else ""
        signature = (flags, backend, mode, self.dump_dir)
        if bucket.step_fn is None or bucket.step_signature != signature:
            key = StepKey(backend, bucket.device.type, bucket.step_args[0].dtype, flags, mode=mode, dump_dir=self.dump_dir)
            bucket.step_fn, bucket.step_signature, bucket.graph = get_bucket_step(key), signature, key.name()
        return bucket.step_fn

    def _step_loose(self, params, group, options, grad_scale, found_inf) -> None:
        # DTensors (FSDP2) are updated through their local shards; their state stays DTensor.
        states = [self.state[p] for p in params]
        self._step_tensors(
            group,
            options,
            local_tensors(params),
            local_tensors([p.grad for p in params], like=params),
            local_tensors([st["square_avg"] for st in states]),
            local_tensors([st["grad_avg"] for st in states]) if group["centered"] else None,
            local_tensors([st["momentum_buffer"] for st in states]) if group["momentum"] > 0 else None,
            [st["step"] for st in states],
            grad_scale,
            found_inf,
        )

    def _step_tensors(
        self, group, options, params, grads, square_avgs, grad_avgs, momentum_buffers, steps, grad_scale, found_inf
    ) -> None:
        """One step over per-tensor lists (the loose path, and the path traced inside a
        user's ``torch.compile``)."""
        torch._foreach_add_(steps, 1)
        if found_inf is not None:
            torch._foreach_sub_(steps, found_inf.to(steps[0].device))
        rmsprop_step(
            params,
            grads,
            square_avgs,
            grad_avgs,
            momentum_buffers,
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            centered=bool(group["centered"]),
            maximize=bool(group["maximize"]),
            eps_in_sqrt=options["eps_in_sqrt"],
            lr_in_momentum=options["lr_in_momentum"],
            decoupled_weight_decay=options["decoupled_weight_decay"],
            lr_scaled_decay=options["lr_scaled_decay"],
            nesterov=options["nesterov"],
            bias_correction=options["bias_correction"],
            state_steps=steps,
            loss_scale=options["loss_scale"],
            grad_scale=grad_scale,
            found_inf=found_inf,
        )
