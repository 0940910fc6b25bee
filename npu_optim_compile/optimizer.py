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

from ._amp import adopt_legacy, amp_of, forget_legacy
from ._bucket_step import BACKENDS
from ._checkpoint import check_state_dict
from ._dump import resolve_dump_dir
from ._engine import StepEngine
from ._fusion_api import TensorFusionAPI, _point_grads_at_slots
from ._mindspore import mindspore_arguments
from ._in_compile import eager_step, init_group, register, traced_step, traced_zero_grad
from ._npu import npu_status, require_torchair
from ._state import track
from ._torchair_backend import MODES as NPU_MODES
from ._validation import check_choice
from .options import TORCH_FIXED, RMSpropOptions

__all__ = ["NpuFusedRMSprop"]


class NpuFusedRMSprop(TensorFusionAPI, Optimizer):
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

    How it is fast, with params that stay yours: the parameters of each (param group,
    device, dtype) are one *bucket*, updated by one call of one compiled kernel. On the
    CPU that kernel (inductor's, compiled once per structure from ``rmsprop_step`` on
    flat buffers) runs over every param, grad and state tensor where it lives, from one
    array of data pointers (``_segments.py``): params, grads and ``optimizer.state`` are
    the tensors torch.optim.RMSprop would have, at the addresses it would have them, so
    checkpoint tools, shared memory, ties and aliases you hold behave as with torch.
    ``step()`` never replaces or writes a ``.grad`` (except to unscale it under a
    GradScaler, as torch does). Anything that moved (``p.data = ...``, ``model.to()``, a
    state tensor replaced, a param whose first grad arrives late, a ``load_state_dict``)
    is read where it now is. On other devices the same compiled step runs on staging
    copies of a bucket (``_executors.py``).

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
            step on staging copies of each bucket, for debugging).
        npu_mode: torchair's mode: ``"max-autotune"`` (default: a GE graph, fused and
            memory-planned by CANN), ``"npugraph_ex"`` or ``"reduce-overhead"`` (ACL-graph
            capture and replay of eager NPU kernels; all step inputs are marked static,
            so a replay copies nothing).
        dump_dir: write each compiled graph's files there (see ``_dump.py``; also the
            environment variable ``NPU_OPTIM_COMPILE_DUMP_DIR``).
        combine_params: torch_npu's tensor fusion, as an explicit choice: params (and
            their state) are moved into one flat buffer per group, device and dtype at
            their first step with a grad, which ``get_combined_params`` /
            ``get_combined_grads`` return; on an accelerator the compiled step then runs
            on those buffers with no staging copy. What it costs: ``p`` becomes a view
            of an optimizer-owned buffer (aliases taken before the first step stop
            following it; params someone else holds, shared-memory params and params
            another optimizer combined are left as they are, ``_combined.py``), and
            ``get_combined_grads`` / ``zero_grad(set_to_none=False)`` keep a flat grad
            buffer (4 bytes per fp32 param). Default False.

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
    optimizer_class=NpuFusedRMSprop)`` and FSDP2 (``fully_shard``), storage other
    engines lay out is updated in place and read where it is: params in ZeRO's buckets
    and grads in DDP's (``gradient_as_bucket_view=True``) take part in the fused call;
    DTensor params are updated per tensor through their local shards, with DTensor
    state, as torch.optim.RMSprop keeps it.

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
        combine_params: bool = False,
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
        if not isinstance(combine_params, bool):
            raise TypeError(f"combine_params must be True or False, got {combine_params!r}")
        self.backend = backend
        self.npu_mode = npu_mode
        self.dump_dir = resolve_dump_dir(dump_dir)
        self.combine_params = combine_params
        defaults = {**chosen.group_entries(), **TORCH_FIXED}
        self._engine = self._new_engine(defaults)
        self._handle = register(self)
        super().__init__(params, defaults)
        self.state = track(self.state)

    def _new_engine(self, defaults: dict[str, Any]) -> StepEngine:
        return StepEngine(
            self.backend, self.npu_mode, self.dump_dir, self._group_aliases, required=defaults,
            combine=self.combine_params,
        )

    @classmethod
    def from_mindspore(cls, params: ParamsT, *args: Any, **kwargs: Any) -> NpuFusedRMSprop:
        """``mindspore.nn.RMSProp``'s update with its argument names and defaults: see
        :func:`npu_optim_compile._mindspore.mindspore_arguments`."""
        params, options = mindspore_arguments(params, *args, **kwargs)
        return cls(params, **options)

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
        self.__dict__.setdefault("combine_params", False)
        if "_engine" not in self.__dict__:
            self._engine = self._new_engine(self.defaults)
            self._handle = register(self)
        self.state = track(self.state)
        self._engine.mark_stale()
        if self._engine.combiner is not None:  # loaded state goes back into the chunks
            self._engine.combiner.adopt(self.state)
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
        state.update(
            backend=self.backend, npu_mode=self.npu_mode, dump_dir=self.dump_dir, combine_params=self.combine_params
        )
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
            adopt_legacy(self, grad_scaler)
        try:
            if torch.compiler.is_compiling():  # inside a user's torch.compile: _in_compile.py
                traced_step(self)
            else:  # (Dynamo-disabled: a frame Dynamo skipped must not trace the engine)
                eager_step(self)
        finally:
            if grad_scaler is not None:
                forget_legacy(self)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``. With ``combine_params=True`` and ``set_to_none=False``,
        each grad of a combined param is pointed at its slot of the chunk's flat grad
        buffer, zeroed (the tensor it replaces is zeroed too, as torch would): backward
        then accumulates straight into the buffer that ``get_combined_grads`` returns."""
        # Dynamo skips torch.optim.Optimizer.zero_grad (a graph break in a compiled train
        # step); inside torch.compile run a traceable equivalent instead.
        if torch.compiler.is_compiling():
            traced_zero_grad(self, set_to_none)
            return
        combiner = self._engine.combiner
        if set_to_none or combiner is None:
            super().zero_grad(set_to_none)
            return
        with torch.no_grad():
            for chunk in combiner.chunks:
                if chunk.in_place():
                    chunk.grad.zero_()
                    for g in _point_grads_at_slots(chunk, copy=False):
                        _zero_as_torch(g)
            super().zero_grad(False)  # the rest, and the slots (already zero)

    def describe_buckets(self) -> list[dict[str, Any]]:
        """One entry per bucket of the last step: group, device, dtype, tensors,
        elements, state roles, kind (how it runs) and the compiled graph's name."""
        return self._engine.describe()


def _zero_as_torch(g: Tensor) -> None:
    """What ``Optimizer.zero_grad(set_to_none=False)`` does to one grad."""
    if g.grad_fn is not None:
        g.detach_()
    else:
        g.requires_grad_(False)
    g.zero_()


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
