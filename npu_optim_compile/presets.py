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

from .functional import Scalar
from .optimizer import NpuFusedRMSprop
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

    Weight decay is coupled (:math:`g \leftarrow g + \lambda\theta`), or with
    ``decoupled_decay=True`` torch_npu's :math:`\theta \leftarrow \theta - \lambda\theta`:
    note **no lr factor**, unlike timm's ``RMSpropTF`` (:math:`\theta(1 - \gamma\lambda)`,
    which is ``NpuFusedRMSprop(decoupled_weight_decay=True)``).

    Args are torch_npu's, with its defaults (``alpha=0.9``, ``eps=1e-10``,
    ``lr_in_momentum=True``); keyword options of :class:`NpuFusedRMSprop` (``backend``,
    ``maximize``, ``nesterov``, ``bias_correction``, ``loss_scale``) are accepted too.
    Param groups may also carry torch_npu's key ``decoupled_decay``.
    """

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
        fixed = {"eps_in_sqrt", "initial_square_avg", "decoupled_weight_decay", "lr_in_momentum"}
        clash = fixed & options.keys()
        if clash:
            raise TypeError(
                f"NpuFusedRMSpropTF fixes {sorted(clash)} (TensorFlow semantics; use "
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
            **options,
        )

    def _group_options(self, group: dict) -> dict[str, Any]:
        options = super()._group_options(group)
        if "decoupled_decay" in group:  # torch_npu's name for it
            options["decoupled_weight_decay"] = bool(group["decoupled_decay"])
        options["lr_scaled_decay"] = False  # torch_npu: p <- p - wd * p
        return options


def from_mindspore(
    params: ParamsT,
    learning_rate: float = 0.1,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    use_locking: bool = False,
    centered: bool = False,
    loss_scale: float = 1.0,
    weight_decay: float = 0.0,
    optimizer_class: type[NpuFusedRMSprop] = NpuFusedRMSprop,
    **options: Any,
) -> NpuFusedRMSprop:
    r"""``mindspore.nn.RMSProp``'s update, with its argument names and defaults.

    .. math::

        \begin{aligned}
        g &\leftarrow (g + \lambda\theta) / s, \qquad s_0 = 1 \text{ (mean square)} \\
        v &\leftarrow \rho v + (1 - \rho) g^2, \qquad
            m \leftarrow \beta m + \eta\, g / \sqrt{v + \epsilon}
            \ \ (\text{centered: } \sqrt{v - \bar g^2 + \epsilon}), \qquad
            \theta \leftarrow \theta - m
        \end{aligned}

    with :math:`\eta` = ``learning_rate``, :math:`\rho` = ``decay``, :math:`\beta` =
    ``momentum``, :math:`s` = ``loss_scale``, :math:`\lambda` = ``weight_decay``.
    MindSpore adds the L2 term to the *scaled* gradient and then divides by the loss
    scale, so the decay here is ``weight_decay / loss_scale``. MindSpore decays only
    params whose names contain neither ``beta`` nor ``gamma``: pass named parameters
    (``model.named_parameters()``) to get the same split; for plain tensors every
    param is decayed. ``use_locking`` has no meaning in PyTorch and is ignored.
    Keyword options of :class:`NpuFusedRMSprop` (``backend``, ...) pass through.
    """
    del use_locking
    if not epsilon > 0:
        raise ValueError(f"Invalid epsilon value: {epsilon} (MindSpore's RMSProp needs epsilon > 0)")
    if not loss_scale > 0:
        raise ValueError(f"Invalid loss_scale value: {loss_scale} (must be > 0)")
    params = list(params)
    if params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        exempt = ["beta" in name or "gamma" in name for name, _ in params]
        no_decay = [p for p, skip in zip(params, exempt) if skip]
        decay_params = [p for p, skip in zip(params, exempt) if not skip]
        params = [g for g in ({"params": decay_params}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return optimizer_class(
        params,
        lr=learning_rate,
        alpha=decay,
        eps=epsilon,
        weight_decay=weight_decay / loss_scale,
        momentum=momentum,
        centered=centered,
        eps_in_sqrt=True,
        initial_square_avg=1.0,
        lr_in_momentum=True,
        loss_scale=loss_scale,
        **options,
    )


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
        bias_correction=bias_correction, lr_in_momentum=True

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
            nesterov=nesterov, bias_correction=bias_correction,
        )

    return PureRMSprop(init, update)
