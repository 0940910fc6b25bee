"""RMSprop as other frameworks define it, on the same fused engine."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from .optimizer import NpuFusedRMSprop

__all__ = ["NpuFusedRMSpropTF"]


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
