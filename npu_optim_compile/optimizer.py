"""``NpuFusedRMSprop``: torch.optim.RMSprop's results, one compiled kernel per bucket."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from ._buckets import GroupLayout
from ._compile import BACKENDS, StepKey, get_bucket_step
from ._npu import require_torchair
from .functional import rmsprop_step

__all__ = ["NpuFusedRMSprop"]

_HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum")


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


def _hyper_dtype(device: torch.device) -> torch.dtype:
    # float64 reproduces torch's Python-float arithmetic (1 - alpha, -lr) exactly; the
    # Ascend graph engines handle float32 scalars best.
    return torch.float32 if device.type == "npu" else torch.float64


class _HyperTensor:
    """A group's hyperparameters on one device, ``[lr, alpha, eps, weight_decay,
    momentum]`` in one 1-D tensor (see Note [hyperparameters in one 1-D tensor] in
    ``_compile.py``), refreshed before each step without recompiling anything."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(len(_HYPERPARAMETERS), dtype=_hyper_dtype(device), device=device)
        self._seen: tuple | None = None

    def refresh(self, group: dict) -> Tensor:
        values = tuple(group[name] for name in _HYPERPARAMETERS)
        if any(isinstance(v, Tensor) for v in values):
            for i, v in enumerate(values):
                self.tensor[i].copy_(v.detach().reshape(()) if isinstance(v, Tensor) else v)
            self._seen = None
        elif values != self._seen:
            self.tensor.copy_(torch.tensor(values, dtype=self.tensor.dtype))
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

    Hyperparameters live in 0-d tensors inside the compiled graph: changing them, with
    an LR scheduler or by hand, never recompiles. The state_dict has
    torch.optim.RMSprop's format, and each loads into the other.
    """

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
        backend: str = "auto",
    ) -> None:
        _validate_hyperparameters(lr, alpha, eps, weight_decay, momentum)
        if backend not in BACKENDS:
            raise ValueError(
                f"Invalid backend: {backend!r}. Choose one of {', '.join(map(repr, BACKENDS))}"
            )
        if backend == "torchair":  # fail now, saying what is missing, not at the first step
            require_torchair("NpuFusedRMSprop(backend='torchair')")
        self.backend = backend
        self._layouts: dict[int, GroupLayout] = {}
        self._hyper: dict[tuple[int, torch.device], _HyperTensor] = {}
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
        super().__init__(params, defaults)

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
        self.__dict__.setdefault("_layouts", {})
        self.__dict__.setdefault("_hyper", {})
        for layout in self._layouts.values():
            layout.stale = True
        for group in self.param_groups:
            for key, default in (("momentum", 0), ("centered", False), ("maximize", False)):
                group.setdefault(key, default)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["backend"] = self.backend
        return state

    @torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model and
                returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group)
        return loss

    # -- internals -------------------------------------------------------------------

    def _layout(self, index: int, group: dict, params: list[Tensor], roles: tuple) -> GroupLayout:
        layout = self._layouts.get(index)
        if layout is not None and not layout.stale and layout.roles == roles and layout.matches(params):
            try:
                layout.sync_grads(params)
                return layout
            except RuntimeError:  # a grad without storage (sparse): checked below
                pass
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("NpuFusedRMSprop does not support sparse gradients")
        layout = GroupLayout.build(params, self.state, roles, layout)
        self._layouts[index] = layout
        return layout

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "torchair" if device.type == "npu" else "inductor"
        return self.backend

    def _step_group(self, index: int, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        centered = bool(group["centered"])
        use_momentum = group["momentum"] > 0
        roles = ("square_avg",) + (("grad_avg",) if centered else ()) + (
            ("momentum_buffer",) if use_momentum else ()
        )
        layout = self._layout(index, group, params, roles)
        use_wd = isinstance(group["weight_decay"], Tensor) or group["weight_decay"] != 0
        maximize = bool(group["maximize"])

        for bucket in layout.buckets:
            bucket.steps.add_(1)
            hyper = self._hyper.get((index, bucket.device))
            if hyper is None:
                hyper = self._hyper[(index, bucket.device)] = _HyperTensor(bucket.device)
            key = StepKey(
                backend=self._resolve_backend(bucket.device),
                device_type=bucket.device.type,
                dtype=bucket.math_dtype,
                centered=centered,
                momentum=use_momentum,
                weight_decay=use_wd,
                maximize=maximize,
            )
            get_bucket_step(key)(*bucket.step_args, hyper.refresh(group))

        if layout.loose:  # params that cannot be views of a flat buffer: plain foreach
            states = [self.state[p] for p in layout.loose]
            for st in states:
                st["step"] += 1
            rmsprop_step(
                layout.loose,
                [p.grad for p in layout.loose],
                [st["square_avg"] for st in states],
                [st["grad_avg"] for st in states] if centered else None,
                [st["momentum_buffer"] for st in states] if use_momentum else None,
                lr=group["lr"],
                alpha=group["alpha"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                centered=centered,
                maximize=maximize,
            )
