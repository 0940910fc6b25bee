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

    #: torch_npu's group key for decoupled decay.
    _group_aliases = {"decoupled_decay": "decoupled_weight_decay"}

    #: What TensorFlow semantics fix (use NpuFusedRMSprop to choose them freely).
    _FIXED = ("eps_in_sqrt", "initial_square_avg", "decoupled_weight_decay", "lr_scaled_decay", "lr_in_momentum")

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
            **options,
        )


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

    What MindSpore 2.10.0 does (``mindspore/nn/optim/rmsprop.py`` ``RMSProp.construct``,
    lines 244-270, and ``mindspore/nn/optim/optimizer.py``), with :math:`\hat g` the
    gradient it receives, still multiplied by the loss scale :math:`s`:

    .. math::

        \begin{aligned}
        \hat g &\leftarrow \hat g + (\lambda s)\,\theta
            && \text{decay\_weight: the stored decay is } \lambda s \\
        g &\leftarrow \hat g \cdot (1/s) = \hat g / s + \lambda\theta
            && \text{scale\_grad} \\
        v &\leftarrow v + (g^2 - v)(1 - \rho), \quad v_0 = 1 \\
        m &\leftarrow \beta m + \eta\, g / \sqrt{v + \epsilon}
            \ \ (\text{centered: } \bar g \leftarrow \bar g + (g - \bar g)(1 - \rho),
            \sqrt{v - \bar g^2 + \epsilon}), \qquad \theta \leftarrow \theta - m
        \end{aligned}

    with :math:`\eta` = ``learning_rate``, :math:`\rho` = ``decay``, :math:`\beta` =
    ``momentum``, :math:`\lambda` = ``weight_decay``. Sources:
    ``_preprocess_weight_decay`` stores ``weight_decay * loss_scale`` (optimizer.py
    line 496) for the optimizer's decay (238) and for each group's (626-629);
    ``decay_weight`` / ``_tensor_apply_decay`` add ``weight * decay`` to the still-scaled
    gradient (397-418, 862-867); ``scale_grad`` / ``_grad_scale`` then multiply by
    ``1 / loss_scale`` (282-283, 439-456, 915-918); ``ApplyRMSProp`` /
    ``ApplyCenteredRMSProp`` is the kernel (``rmsprop_cpu_kernel.cc``). So the decay
    acting on the unscaled gradient is :math:`\lambda` itself, which is
    ``NpuFusedRMSprop(weight_decay=weight_decay, loss_scale=loss_scale)`` (the loss
    scale divides first, then :math:`\lambda\theta` is added).

    Which params decay (optimizer.py lines 251-273):

    - ungrouped params: those whose name contains neither ``beta`` nor ``gamma``. Pass
      named parameters (``model.named_parameters()``) to get this filter; plain tensors
      have no names, and every one of them is decayed.
    - param groups (dicts): each group decays with its own ``'weight_decay'`` or, if it
      has none, ``weight_decay``, applied to *every* param of the group (no name
      filter; a group of named parameters is not filtered either). Group keys
      ``'params'``, ``'lr'`` and ``'weight_decay'`` are PyTorch's names too and pass
      through; ``'grad_centralization': False`` is accepted, ``True`` raises (no
      equivalent here); an ``{'order_params': ...}`` dict only orders MindSpore's update
      and is dropped. Other keys pass through as ``NpuFusedRMSprop`` group options.

    MindSpore keeps :math:`\lambda s` and :math:`1/s` as float32 tensors; here they
    are not rounded. ``use_locking`` has no meaning in PyTorch and is ignored. Keyword
    options of :class:`NpuFusedRMSprop` (``backend``, ...) pass through.
    """
    del use_locking
    if not epsilon > 0:
        raise ValueError(f"Invalid epsilon value: {epsilon} (MindSpore's RMSProp needs epsilon > 0)")
    if not loss_scale > 0:
        raise ValueError(f"Invalid loss_scale value: {loss_scale} (must be > 0)")
    params = list(params)
    if params and all(isinstance(p, dict) for p in params):
        groups = []
        for group in params:
            if "order_params" in group:
                if len(group) > 1:
                    raise ValueError(
                        "the order params dict in group parameters should only include the "
                        f"'order_params' key (as in MindSpore), got {sorted(group)}"
                    )
                continue
            group = dict(group)
            if group.pop("grad_centralization", False):
                raise ValueError(
                    "MindSpore's 'grad_centralization' has no equivalent in NpuFusedRMSprop; "
                    "drop it or set it to False"
                )
            groups.append(group)
        params = groups
    elif params and all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in params):
        exempt = ["beta" in name or "gamma" in name for name, _ in params]
        no_decay = [p for p, skip in zip(params, exempt) if skip]
        decay_params = [p for p, skip in zip(params, exempt) if not skip]
        params = [g for g in ({"params": decay_params}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return optimizer_class(
        params,
        lr=learning_rate,
        alpha=decay,
        eps=epsilon,
        weight_decay=weight_decay,
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
