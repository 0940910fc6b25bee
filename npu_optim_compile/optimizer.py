"""``NpuFusedRMSprop``: the ``torch.optim.Optimizer`` facade of the fused step.

This module is the surface torch users see: the constructor, param groups, state_dict
and its hooks, ``zero_grad``, GradScaler's contracts and torch_npu's tensor-fusion API.
The step itself is the engine's (``_engine.py``); inside a user's ``torch.compile`` the
same engine runs behind one custom op (``_in_compile.py``).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _get_scalar_dtype

from ._bucket_step import BACKENDS
from ._dump import resolve_dump_dir
from ._engine import Amp, StepEngine
from ._in_compile import init_group, register, traced_step, traced_zero_grad
from ._npu import npu_status, require_torchair
from ._ownership import is_foreign
from ._state import track
from ._torchair_backend import MODES as NPU_MODES
from ._validation import check_choice
from .options import STATE_ROLES, RMSpropOptions

__all__ = ["NpuFusedRMSprop"]

#: torch.optim.RMSprop's group keys that this optimizer keeps fixed (its state_dicts
#: carry them, so ours do too).
_TORCH_FIXED = dict(capturable=False, foreach=None, differentiable=False)


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
    into one flat buffer, and so is each state buffer; ``p`` and ``optimizer.state[p]``
    become views of those buffers. The update of a whole bucket is one compiled kernel.
    Grads stay the user's: ``step()`` never replaces or writes a ``.grad`` (except to
    unscale it under a GradScaler, as torch does); it copies the grads autograd
    allocated into a flat grad buffer with one C-level call per bucket.
    ``zero_grad(set_to_none=False)`` points each grad at its slot of that buffer, so
    backward accumulates straight into it and the copy is skipped. Anything that moved
    (``p.data = ...``, ``model.to()``, a state tensor's ``.data`` or ``set_``, a param
    whose first grad arrives late, a ``load_state_dict``) is detected and gathered
    again, never silently dropped.

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
    :func:`~npu_optim_compile.rmsprop_step`; the list is :class:`RMSpropOptions`):

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
        lr_scaled_decay: with decoupled decay, ``False`` shrinks by :math:`1 - \lambda`
            without the lr factor (torch_npu's ``NpuFusedRMSpropTF``).
        caution: timm's cautious mask: where the momentum step's sign disagrees with the
            gradient's it is dropped, the rest rescaled by the kept fraction (per param).
        corrected_weight_decay: timm's: decoupled decay scaled by
            :math:`\gamma^2 / \gamma_{\max}` instead of :math:`\gamma`.
        max_lr: :math:`\gamma_{\max}`; by default the ``lr`` given here (timm's
            ``max_lr_snapshot``).

    Hyperparameters live in a tensor inside the compiled graph: changing them, with an
    LR scheduler or by hand, never recompiles. The state_dict has torch.optim.RMSprop's
    format, and each loads into the other.

    Mixed precision: ``torch.amp.GradScaler`` works as with any optimizer. Because this
    class sets ``_step_supports_amp_scaling``, the scaler passes its scale and its
    found-inf flag as tensors: the step unscales the grads in place (what the scaler's
    ``unscale_`` does, so ``p.grad`` holds the true gradient afterwards, as with
    torch.optim.RMSprop) and skips an overflowing step inside the compiled kernel, with
    no ``.item()`` synchronisation.

    Distributed: under ``DistributedDataParallel``, ``ZeroRedundancyOptimizer(
    optimizer_class=NpuFusedRMSprop)`` and FSDP2 (``fully_shard``), storage the engine
    lays out is never re-pointed (``_ownership.py``): params in ZeRO's buckets and DTensor
    params are updated in place per tensor (DTensors through their local shards, with
    DTensor state, as torch.optim.RMSprop keeps it), and grads in DDP's buckets
    (``gradient_as_bucket_view=True``) are copied into the flat grad buffer.

    Inside a user's ``torch.compile`` (a whole train step; see
    :func:`~npu_optim_compile.compile_train_step`), ``step()`` is one custom op that
    runs this same fused engine (``_in_compile.py``): no graph break, one kernel per
    bucket, a compile time that does not grow with the number of tensors; the first
    trace turns a float ``lr`` into a 0-d tensor, so LR schedulers never recompile.
    """

    # torch.amp.GradScaler then hands us grad_scale / found_inf tensors instead of
    # unscaling and checking with .item() itself: the step does both.
    _step_supports_amp_scaling = True

    # Run by Dynamo in Python when step() is traced (Note [Dynamo and _init_group]).
    _init_group = init_group

    #: Other frameworks' param-group keys this class reads as ours.
    _group_aliases: dict[str, str] = {}

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
        backend: str = "auto",
        npu_mode: str = "max-autotune",
        dump_dir: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        RMSpropOptions.check_keywords(options, type(self).__name__)
        if options.get("corrected_weight_decay") and options.get("max_lr") is None:
            options["max_lr"] = float(lr)  # timm's max_lr_snapshot: the constructor's lr
        chosen = RMSpropOptions(
            lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered, **options
        )
        check_choice("backend", backend, BACKENDS)
        check_choice("npu_mode", npu_mode, NPU_MODES)
        if backend == "torchair":  # fail now, saying what is missing, not at the first step
            require_torchair(f"{type(self).__name__}(backend='torchair')")
            status = npu_status()
            if not status.available:
                raise RuntimeError(f"{type(self).__name__}(backend='torchair') needs an Ascend NPU: {status.reason}")
        self.backend = backend
        self.npu_mode = npu_mode
        self.dump_dir = resolve_dump_dir(dump_dir)
        self._engine = StepEngine(backend, npu_mode, self.dump_dir, self._group_aliases)
        self._handle = register(self)
        defaults = {**chosen.group_entries(), **_TORCH_FIXED}
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
        try:
            RMSpropOptions.from_group(group, self._group_aliases)
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also reached from load_state_dict, whose loaded tensors replace our views:
        # mark the layouts stale, so the next step gathers the loaded values and frees
        # the old buffers.
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("npu_mode", "max-autotune")
        self.__dict__.setdefault("dump_dir", "")
        if "_engine" not in self.__dict__:
            self._engine = StepEngine(self.backend, self.npu_mode, self.dump_dir, self._group_aliases)
            self._handle = register(self)
        self.state = track(self.state)
        self._engine.mark_stale()
        for value in self.state.values():  # old checkpoints: a float step, as torch upgrades
            if isinstance(value, Mapping) and "step" in value and not torch.is_tensor(value["step"]):
                value["step"] = torch.tensor(float(value["step"]), dtype=_get_scalar_dtype())
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
        ``torch.load(weights_only=True)``). Entries that are not per-parameter dicts
        (a hook may put any value into ``optimizer.state``) are kept as they are."""
        state_dict = super().state_dict()
        state_dict["state"] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, after checking that the checkpoint is an RMSprop
        state for these params (``ValueError`` naming the param and the key otherwise:
        another optimizer's state, a missing buffer or a buffer of another shape would
        otherwise train on silently wrong state)."""
        check_state_dict(self, state_dict)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def step(self, closure=None, **kwargs):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
            grad_scaler (keyword, optional): passed by GradScalers that follow the legacy
                ``_step_supports_amp_scaling`` contract (torch_npu's
                ``torch_npu.npu.amp.GradScaler``): the grads are unscaled in place and
                an overflowing step is skipped inside the compiled step.
                ``torch.amp.GradScaler`` instead sets ``grad_scale`` / ``found_inf``.

        A step that raises changes nothing: params, state and step counts keep their
        values (``_engine.py``).
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
            if torch.compiler.is_compiling():  # inside a user's torch.compile: _in_compile.py
                traced_step(self)
            else:
                self._engine.step(self.param_groups, self.state, self._amp())
        finally:
            if grad_scaler is not None:
                self.__dict__.pop("found_inf", None)
                self.__dict__.pop("grad_scale", None)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``. With ``set_to_none=False`` each grad of a param in a
        flat bucket is pointed at its slot of the flat grad buffer, zeroed (the tensor
        it replaces is zeroed too): backward then accumulates straight into the
        buffer, and the next step copies nothing."""
        # Dynamo skips torch.optim.Optimizer.zero_grad (a graph break in a compiled train
        # step); inside torch.compile run a traceable equivalent instead.
        if torch.compiler.is_compiling():
            traced_zero_grad(self, set_to_none)
        elif set_to_none:
            super().zero_grad(True)
        else:
            with torch.no_grad():
                for g in self._engine.zero_grad_into_buffers(self.param_groups):
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    def _amp(self) -> Amp:
        return Amp(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))

    def _adopt_legacy_scaler(self, scaler) -> None:
        """The legacy contract, done as the current one: the scaler checks the grads for
        inf/NaN (which records what ``scaler.update()`` reads), and the step unscales
        them in place and skips on inf. fp16 grads are fine here (``unscale_`` refuses
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

    def _prepared(self) -> list[tuple[Any, tuple, tuple]]:
        out = []
        for index, group in enumerate(self.param_groups):
            prepared = self._engine.prepare(index, group, self._engine.options(index, group), self.state)
            if prepared is not None:
                out.append(prepared)
        return out

    def describe_buckets(self) -> list[dict[str, Any]]:
        """One entry per bucket of the last step: group, device, dtype, tensors, elements."""
        return self._engine.describe()

    def get_combined_params(self) -> list[Tensor]:
        """The flat param buffers, one per (param group, device, dtype) bucket, of the
        params that have a grad now (torch_npu's ``get_combined_params``; torch_npu
        combines per dtype across groups). Each such param is a view of one of them, except
        params on the per-tensor path (memory owned elsewhere, non-dense, zero-size).
        Within a buffer, contiguous params of one shape lie next to each other (their
        grads are gathered with one ``torch.stack``), so the order is not the group's."""
        return [b.param for layout, _, _ in self._prepared() for b in layout.buckets]

    def get_combined_grads(self) -> list[Tensor]:
        """The flat grad buffers, bucket by bucket (torch_npu's ``get_combined_grads``).
        Each ``p.grad`` is pointed at its slot of them first (as
        ``zero_grad(set_to_none=False)`` does), so writing into them writes the grads."""
        return self._combined_grads(self._prepared())

    @staticmethod
    def _combined_grads(prepared: list[tuple[Any, tuple, tuple]]) -> list[Tensor]:
        out = []
        for layout, grads, ptrs in prepared:
            for bucket in layout.buckets:
                bucket.load_grads(bucket.take_grads(grads), bucket.take_grads(ptrs))
                for p, slot in zip(bucket.params, bucket.slots):
                    if p.grad.data_ptr() != slot.data_ptr() and not is_foreign(p.grad):
                        p.grad = bucket.slot_view(slot)
                out.append(bucket.grad)
        return out

    @torch.no_grad()
    def clip_grad_norm_fused_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the grads of all groups to a total norm of ``max_norm``, in place:
        ``torch.nn.utils.clip_grad_norm_``'s result with one norm and one scale per
        bucket (on the flat grad buffers, see :meth:`get_combined_grads`). Returns the
        total norm before clipping."""
        prepared = self._prepared()
        grads = self._combined_grads(prepared) + [p.grad for layout, _, _ in prepared for p in layout.loose]
        if not grads:
            return torch.tensor(0.0)
        norm_type = float(norm_type)
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total


def _signature() -> inspect.Signature:
    """``NpuFusedRMSprop.__init__``'s signature with every option spelled out (for
    ``help()`` and IDEs), generated from :class:`RMSpropOptions`."""
    base = inspect.signature(NpuFusedRMSprop.__init__)
    params = [p for p in base.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    defaults = RMSpropOptions.defaults()
    for name in RMSpropOptions.names():
        if name in base.parameters:
            continue
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults[name]))
    return base.replace(parameters=params)


NpuFusedRMSprop.__init__.__signature__ = _signature()


def check_state_dict(opt: NpuFusedRMSprop, state_dict: Mapping[str, Any]) -> None:
    """``ValueError`` when ``state_dict`` is not an RMSprop state for ``opt``'s params:
    each per-parameter entry must hold ``step`` and the buffers its group's options
    keep, each of its param's shape. (Extra keys are kept, as torch keeps them.)"""
    saved_groups = state_dict.get("param_groups", [])
    saved_state = state_dict.get("state", {})
    if len(saved_groups) != len(opt.param_groups):
        return  # torch's own check reports this one
    for index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        roles = RMSpropOptions.from_group(merged, opt._group_aliases).roles
        for position, (p, key) in enumerate(zip(group["params"], saved.get("params", []))):
            entry = saved_state.get(key)
            if entry is None:
                continue
            where = f"param group {index}, parameter {position} (state key {key!r})"
            if not isinstance(entry, Mapping):
                raise ValueError(f"state_dict: the state of {where} is a {type(entry).__name__}, not a dict")
            missing = [k for k in ("step", *roles) if k not in entry]
            if missing:
                raise ValueError(
                    f"state_dict: the state of {where} has no {', '.join(map(repr, missing))} "
                    f"(it holds {sorted(entry)}): not an RMSprop state for these options"
                )
            for role in STATE_ROLES:
                value = entry.get(role)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"state_dict: {role!r} of {where} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
