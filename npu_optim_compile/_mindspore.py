"""MindSpore's ``nn.RMSProp`` arguments, translated to ``NpuFusedRMSprop``'s.

Used by ``NpuFusedRMSprop.from_mindspore`` and ``presets.from_mindspore``; imports
neither (the dependency runs one way: presets -> optimizer -> this module).
"""

from __future__ import annotations

from typing import Any

from torch.optim.optimizer import ParamsT

from ._validation import check_loss_scale, check_positive

__all__ = ["mindspore_arguments"]


def mindspore_arguments(
    params: ParamsT,
    learning_rate: float = 0.1,
    decay: float = 0.9,
    momentum: float = 0.0,
    epsilon: float = 1e-10,
    use_locking: bool = False,
    centered: bool = False,
    loss_scale: float = 1.0,
    weight_decay: float = 0.0,
    **options: Any,
) -> tuple[Any, dict[str, Any]]:
    r"""``mindspore.nn.RMSProp``'s update as ``(params, keywords)`` of ``NpuFusedRMSprop``.

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
    are not rounded, and its kernel computes :math:`1 - \rho` in float32 where ours
    rounds the float64 value. The mean square, mean gradient and moment follow the
    kernel's order of operations (``op_order="tf"``, overridable), so the rest of the
    fp32 rounding is MindSpore's. ``use_locking`` has no meaning in PyTorch and is
    ignored. Keyword options of :class:`NpuFusedRMSprop` (``backend``, ...) pass through.
    """
    del use_locking
    options.setdefault("op_order", "tf")
    check_positive("epsilon", epsilon, "MindSpore's RMSProp needs epsilon > 0")
    check_loss_scale(loss_scale)
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
    return params, dict(
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
