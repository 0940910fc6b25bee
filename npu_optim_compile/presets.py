"""RMSprop as other frameworks define it, on the same fused engine and pure API.

- :class:`NpuFusedRMSpropTF`: torch_npu's ``NpuFusedRMSpropTF`` (TensorFlow-style, as
  timm's ``RMSpropTF``).
- :func:`from_mindspore` (also ``NpuFusedRMSprop.from_mindspore``):
  ``mindspore.nn.RMSProp``'s arguments and update.
- :func:`optax_rmsprop`: ``optax.rmsprop``'s arguments, on the pure API.

Each maps its framework's arguments onto the options of :class:`NpuFusedRMSprop` /
:func:`rmsprop_update`; none adds math of its own.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from ._mindspore import mindspore_arguments
from .optimizer import NpuFusedRMSprop
from .options import Scalar
from .pure import PureRMSprop, PyTree, RMSpropState, rmsprop_init, rmsprop_update

__all__ = ["NpuFusedRMSpropTF", "from_mindspore", "optax_rmsprop"]


class NpuFusedRMSpropTF(NpuFusedRMSprop):
    r"""torch_npu's ``NpuFusedRMSpropTF`` (TensorFlow-style RMSprop, as in timm), fused.

    .. math::

        \begin{aligned}
        v_0 &= 1, \qquad v \leftarrow \alpha v + (1 - \alpha) g^2, \qquad
            d \leftarrow \sqrt{v + \epsilon}
            \ \ (\text{centered: } \sqrt{v - \bar g^2 + \epsilon}) \\
        b &\leftarrow \mu b + \gamma g / d, \quad \theta \leftarrow \theta - b
            \qquad (\texttt{lr\_in\_momentum=True}) \\
        b &\leftarrow \mu b + g / d, \quad \theta \leftarrow \theta - \gamma b
            \qquad (\texttt{lr\_in\_momentum=False}) \\
        \theta &\leftarrow \theta - \gamma\, g / d \qquad (\mu = 0)
        \end{aligned}

    The mean square is updated in TensorFlow's order, :math:`v \leftarrow v + (1 -
    \alpha)(g^2 - v)`, and lr in the momentum as :math:`(\gamma g) / d`, as torch_npu
    does (``op_order="tf"``), so fp32 rounds as there.

    Weight decay is coupled (:math:`g \leftarrow g + \lambda\theta`), or with
    ``decoupled_decay=True`` torch_npu's :math:`\theta \leftarrow \theta - \lambda\theta`:
    note **no lr factor**, unlike timm's ``RMSpropTF`` (:math:`\theta(1 - \gamma\lambda)`,
    which is ``NpuFusedRMSprop(decoupled_weight_decay=True)``).

    Args are torch_npu's, with its defaults (``alpha=0.9``, ``eps=1e-10``,
    ``lr_in_momentum=True``); keyword options of :class:`NpuFusedRMSprop` (``backend``,
    ``maximize``, ``nesterov``, ``bias_correction``, ``loss_scale``) are accepted too.
    Param groups may also carry torch_npu's key ``decoupled_decay``.
    """

    #: torch_npu's group key for decoupled decay.
    _group_aliases = {"decoupled_decay": "decoupled_weight_decay"}

    #: What TensorFlow semantics fix (use NpuFusedRMSprop to choose them freely).
    _FIXED = ("eps_in_sqrt", "initial_square_avg", "decoupled_weight_decay", "lr_scaled_decay", "lr_in_momentum",
              "op_order")

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0,
        momentum: float = 0.0,
        centered: bool = False,
        decoupled_decay: bool = False,
        lr_in_momentum: bool = True,
        **options: Any,
    ) -> None:
        clash = sorted(set(self._FIXED) & options.keys())
        if clash:
            raise TypeError(
                f"NpuFusedRMSpropTF fixes {clash} (TensorFlow semantics; use "
                "decoupled_decay / lr_in_momentum); use NpuFusedRMSprop to choose them freely"
            )
        super().__init__(
            params,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=weight_decay,
            momentum=momentum,
            centered=centered,
            eps_in_sqrt=True,
            initial_square_avg=1.0,
            lr_in_momentum=lr_in_momentum,
            decoupled_weight_decay=decoupled_decay,
            lr_scaled_decay=False,  # torch_npu: p <- p - wd * p
            op_order="tf",  # torch_npu: square_avg.add_(1 - alpha, grad.pow(2) - square_avg), addcdiv_(lr, g, avg)
            **options,
        )


def from_mindspore(
    params: ParamsT, *args: Any, optimizer_class: type[NpuFusedRMSprop] = NpuFusedRMSprop, **kwargs: Any
) -> NpuFusedRMSprop:
    """``mindspore.nn.RMSProp``'s update, with its argument names and defaults
    (``learning_rate=0.1, decay=0.9, momentum=0.0, epsilon=1e-10, use_locking=False,
    centered=False, loss_scale=1.0, weight_decay=0.0``): what MindSpore 2.10.0 does, and
    which params decay, is in :func:`npu_optim_compile._mindspore.mindspore_arguments`.
    Keyword options of ``optimizer_class`` (``backend``, ...) pass through."""
    params, options = mindspore_arguments(params, *args, **kwargs)
    return optimizer_class(params, **options)


def optax_rmsprop(
    learning_rate: Scalar,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
) -> PureRMSprop:
    r"""``optax.rmsprop``'s update, with its arguments and defaults, on :func:`rmsprop_update`.

    optax composes ``scale_by_rms`` (or ``scale_by_stddev`` when centered),
    ``scale_by_learning_rate`` and, with a momentum, ``trace``: so :math:`\epsilon` is
    inside the root by default and the learning rate is inside the momentum trace::

        alpha=decay, eps=eps, initial_square_avg=initial_scale, eps_in_sqrt=eps_in_sqrt,
        centered=centered, momentum=momentum or 0, nesterov=nesterov,
        bias_correction=bias_correction, lr_in_momentum=True, op_order="optax"

    (``op_order="optax"``: optax's moments, :math:`(1 - \rho) g^2 + \rho\nu`, so fp32
    rounds as optax's source orders it; XLA may still fuse a multiply-add into one
    FMA, and optax's ``g * rsqrt(...)`` is our ``g / sqrt(...)``.)

    Example::

        opt = optax_rmsprop(1e-3, momentum=0.9, nesterov=True)
        state = opt.init(params)
        params, state = opt.update(params, grads, state)

    Unlike optax, ``update`` returns the new params rather than the updates to add.
    """
    mu = 0.0 if momentum is None else momentum

    def init(params: PyTree) -> RMSpropState:
        return rmsprop_init(params, momentum=mu, centered=centered, initial_square_avg=initial_scale)

    def update(params: PyTree, grads: PyTree, state: RMSpropState) -> tuple[PyTree, RMSpropState]:
        return rmsprop_update(
            params, grads, state, lr=learning_rate, alpha=decay, eps=eps, momentum=mu,
            centered=centered, eps_in_sqrt=eps_in_sqrt, lr_in_momentum=True,
            nesterov=nesterov, bias_correction=bias_correction, op_order="optax",
        )

    return PureRMSprop(init, update)
