"""The functional RMSprop step: the one source of the update math in this library.

Everything else (the stateful :class:`~npu_optim_compile.NpuFusedRMSprop`, the pure
:func:`~npu_optim_compile.rmsprop_update`) calls :func:`rmsprop_step`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import Tensor

__all__ = ["rmsprop_step", "Scalar"]

#: A hyperparameter: a Python number or a 0-d tensor (a tensor never causes a recompile).
Scalar = Union[float, int, Tensor]


def _is_tensor(x: object) -> bool:
    return isinstance(x, Tensor)


def _add_scalar_(xs: list[Tensor], s: Scalar) -> None:
    """``x += s`` for every x, with s a number or a 0-d tensor.

    Note [foreach_add with a tensor scalar]: inductor (torch 2.13) lowers
    ``aten._foreach_add.Tensor`` by baking the tensor's value at compile time into the
    kernel, so a later change of the tensor is silently ignored. The list form, one
    broadcast 0-d tensor per element, is lowered correctly; tests/test_compile.py
    holds the regression test.
    """
    if _is_tensor(s):
        torch._foreach_add_(xs, [s] * len(xs))
    else:
        torch._foreach_add_(xs, s)


def _real_views(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``view_as_real`` for complex tensors, as torch.optim.RMSprop does (real and
    imaginary parts are treated as independent coordinates)."""
    return [torch.view_as_real(t) if torch.is_complex(t) else t for t in tensors]


def rmsprop_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    grad_avgs: Sequence[Tensor] | None,
    momentum_buffers: Sequence[Tensor] | None,
    *,
    lr: Scalar,
    alpha: Scalar,
    eps: Scalar,
    weight_decay: Scalar,
    momentum: Scalar,
    centered: bool,
    maximize: bool,
) -> None:
    r"""One RMSprop step over lists of tensors, in place, with ``torch._foreach_*`` ops.

    With :math:`\theta` the params (``params``), :math:`g` the grads, :math:`v` the
    mean square (``square_avgs``), :math:`\bar g` the mean gradient (``grad_avgs``),
    :math:`b` the momentum buffer (``momentum_buffers``), :math:`\gamma` = ``lr``,
    :math:`\alpha` = ``alpha``, :math:`\epsilon` = ``eps``, :math:`\lambda` =
    ``weight_decay`` and :math:`\mu` = ``momentum``:

    .. math::

        \begin{aligned}
        g &\leftarrow -g \quad \text{if maximize} \\
        g &\leftarrow g + \lambda \theta \quad \text{if weight decay is on} \\
        v &\leftarrow \alpha v + (1 - \alpha) g^2 \\
        \bar g &\leftarrow \bar g + (1 - \alpha)(g - \bar g) \quad \text{if centered} \\
        d &\leftarrow \sqrt{v - \bar g^2} + \epsilon \ \text{(centered)}
            \quad\text{or}\quad \sqrt{v} + \epsilon \\
        b &\leftarrow \mu b + g / d, \quad \theta \leftarrow \theta - \gamma b
            \quad \text{with momentum buffers} \\
        \theta &\leftarrow \theta - \gamma\, g / d \quad \text{without}
        \end{aligned}

    This is ``torch.optim.RMSprop``'s update: :math:`\epsilon` is added *outside* the
    square root (TensorFlow and optax put it inside), and the mean square starts at 0.

    Args:
        params, grads, square_avgs: equal-length lists; ``params`` and ``square_avgs``
            are updated in place, ``grads`` are read only.
        grad_avgs: the mean gradients, updated in place; used when ``centered`` (may be
            empty or None otherwise).
        momentum_buffers: updated in place. When non-empty, the momentum form is used
            (as torch does for ``momentum > 0``); empty or None means no momentum.
        lr, alpha, eps, weight_decay, momentum: Python numbers or 0-d tensors. A 0-d
            tensor is read at run time, so under ``torch.compile`` changing its value
            never recompiles. A Python number is a constant: under ``torch.compile`` a
            new value is a new graph. Weight decay is skipped when it is the number 0;
            a tensor weight decay is always applied (0 then adds :math:`0 \cdot \theta`).
        centered: subtract the squared mean gradient inside the root.
        maximize: ascend instead of descend.

    Complex tensors are updated as pairs of real numbers (``torch.view_as_real``), as
    torch.optim.RMSprop does. The function is traceable by
    ``torch.compile(fullgraph=True)`` with no graph break.
    """
    if len(params) == 0:
        return
    n = len(params)
    if len(grads) != n or len(square_avgs) != n:
        raise ValueError(
            f"rmsprop_step: params, grads and square_avgs must have the same length; got "
            f"{n}, {len(grads)} and {len(square_avgs)}"
        )
    grad_avgs = list(grad_avgs or [])
    momentum_buffers = list(momentum_buffers or [])
    if centered and len(grad_avgs) != n:
        raise ValueError(f"rmsprop_step: centered=True needs {n} grad_avgs, got {len(grad_avgs)}")
    if momentum_buffers and len(momentum_buffers) != n:
        raise ValueError(
            f"rmsprop_step: expected {n} momentum_buffers (or none), got {len(momentum_buffers)}"
        )

    params = _real_views(params)
    grads = _real_views(grads)
    square_avgs = _real_views(square_avgs)
    grad_avgs = _real_views(grad_avgs)
    momentum_buffers = _real_views(momentum_buffers)

    if maximize:
        grads = torch._foreach_neg(grads)
    if _is_tensor(weight_decay) or weight_decay != 0:
        grads = torch._foreach_add(grads, torch._foreach_mul(params, weight_decay))

    # v <- alpha * v + ((1 - alpha) * g) * g
    one_minus_alpha = 1 - alpha
    scaled_sq = torch._foreach_mul(grads, one_minus_alpha)
    torch._foreach_mul_(scaled_sq, grads)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_add_(square_avgs, scaled_sq)

    if centered:
        # g_avg <- g_avg + (1 - alpha) * (g - g_avg): torch's lerp for weights below 0.5
        delta = torch._foreach_sub(grads, grad_avgs)
        torch._foreach_mul_(delta, one_minus_alpha)
        torch._foreach_add_(grad_avgs, delta)
        denom = torch._foreach_mul(grad_avgs, grad_avgs)
        denom = torch._foreach_sub(square_avgs, denom)
        denom = torch._foreach_sqrt(denom)
    else:
        denom = torch._foreach_sqrt(square_avgs)
    _add_scalar_(denom, eps)

    neg_lr = -lr
    if momentum_buffers:
        # b <- mu * b + g / d ; theta <- theta + (-lr) * b
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, torch._foreach_div(grads, denom))
        torch._foreach_add_(params, torch._foreach_mul(momentum_buffers, neg_lr))
    else:
        # theta <- theta + ((-lr) * g) / d, the operation order of torch's addcdiv
        update = torch._foreach_mul(grads, neg_lr)
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)
