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
    broadcast 0-d tensor per element, is lowered correctly; tests/compile/test_compile.py
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


def _segment_means(masks: Tensor, ids: Tensor, sizes: Tensor) -> Tensor:
    """For each element of ``masks``, the mean of ``masks`` over its segment.

    ``ids`` holds one segment id (int64, 0..k-1) per element of ``masks.reshape(-1)`` and
    ``sizes`` the element count of each of the k segments. The sums are taken in at
    least float32 (exact for 0/1 masks of up to 2**24 elements a segment), divided by the
    size and rounded to the masks' dtype: what ``Tensor.mean`` gives for one segment on
    CPU (a sum, then a division). ``index_add_`` and ``index_select`` trace and compile
    with a dynamic number of elements.
    """
    acc = torch.promote_types(masks.dtype, torch.float32)
    sums = torch.zeros_like(sizes, dtype=acc).index_add_(0, ids, masks.reshape(-1).to(acc))
    means = (sums / sizes).to(masks.dtype)
    return means.index_select(0, ids).view(masks.shape)


def _cautious(
    steps: list[Tensor],
    grads: list[Tensor],
    segment_ids: Sequence[Tensor] | None,
    segment_sizes: Sequence[Tensor] | None,
) -> list[Tensor]:
    """timm's ``_apply_caution`` (Cautious Optimizers, arXiv 2411.16085): keep the step
    where its sign agrees with the gradient's (``step * g > 0``), rescaled by
    ``1 / max(mean(mask), 1e-3)`` with the mean over each parameter; a new list, the
    inputs are not modified."""
    masks = torch._foreach_mul(steps, grads)
    masks = [(m > 0).to(g.dtype) for m, g in zip(masks, grads)]
    if segment_ids is None:
        scales = [m.mean() for m in masks]
    else:
        scales = [_segment_means(m, i, k) for m, i, k in zip(masks, segment_ids, segment_sizes)]
    scales = [x.clamp_min(1e-3) for x in scales]
    masks = torch._foreach_div(masks, scales)
    return torch._foreach_mul(steps, masks)


def check_options(
    *,
    momentum_buffers: bool,
    nesterov: bool,
    loss_scale: Scalar,
    initial_square_avg: float = 0.0,
) -> None:
    """ValueError for option combinations that make no sense (shared by every API)."""
    if nesterov and not momentum_buffers:
        raise ValueError("nesterov=True needs momentum: set momentum > 0 (or pass momentum buffers)")
    if not _is_tensor(loss_scale) and not loss_scale > 0:
        raise ValueError(f"Invalid loss_scale value: {loss_scale} (must be > 0)")
    if not initial_square_avg >= 0:
        raise ValueError(f"Invalid initial_square_avg value: {initial_square_avg} (must be >= 0)")


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
    eps_in_sqrt: bool = False,
    lr_in_momentum: bool = False,
    decoupled_weight_decay: bool = False,
    lr_scaled_decay: bool = True,
    nesterov: bool = False,
    bias_correction: bool = False,
    state_steps: Sequence[Scalar] | None = None,
    loss_scale: Scalar = 1.0,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    caution: bool = False,
    corrected_weight_decay: bool = False,
    max_lr: Scalar | None = None,
    segment_ids: Sequence[Tensor] | None = None,
    segment_sizes: Sequence[Tensor] | None = None,
) -> None:
    r"""One RMSprop step over lists of tensors, in place, with ``torch._foreach_*`` ops.

    With :math:`\theta` the params, :math:`g` the grads, :math:`v` the mean square
    (``square_avgs``), :math:`\bar g` the mean gradient (``grad_avgs``), :math:`b` the
    momentum buffer (``momentum_buffers``), :math:`\gamma` = ``lr``, :math:`\alpha` =
    ``alpha``, :math:`\epsilon` = ``eps``, :math:`\lambda` = ``weight_decay``,
    :math:`\mu` = ``momentum``, :math:`s` = ``loss_scale`` and :math:`t` the step count:

    .. math::

        \begin{aligned}
        g &\leftarrow g / s, \qquad g \leftarrow -g \ \text{(maximize)} \\
        g &\leftarrow g + \lambda \theta
            \quad\text{or, decoupled,}\quad \theta \leftarrow \theta (1 - \gamma\lambda)
            \quad\text{(corrected: } \theta \leftarrow \theta (1 - (\gamma^2 / \gamma_{\max})\lambda)) \\
        v &\leftarrow \alpha v + (1 - \alpha) g^2, \qquad
            \bar g \leftarrow \bar g + (1 - \alpha)(g - \bar g) \ \text{(centered)} \\
        c &\leftarrow 1 - \alpha^t \ \text{(bias correction, else } c = 1), \qquad
            w \leftarrow v / c - [\bar g / c]^2 \ \text{(the bracket if centered)} \\
        d &\leftarrow \sqrt{w} + \epsilon
            \quad\text{or, with eps in the root,}\quad d \leftarrow \sqrt{w + \epsilon} \\
        u &\leftarrow g / d \\
        b &\leftarrow \mu b + u, \quad \theta \leftarrow \theta - \gamma b
            \qquad\text{(momentum; Nesterov: } \theta \leftarrow \theta - \gamma (u + \mu b)) \\
        b &\leftarrow \mu b + \gamma u, \quad \theta \leftarrow \theta - b
            \qquad\text{(lr in momentum; Nesterov: } \theta \leftarrow \theta - (\gamma u + \mu b)) \\
        \theta &\leftarrow \theta - \gamma u \qquad\text{(no momentum buffers)}
        \end{aligned}

    With ``caution`` (momentum buffers only), the step :math:`b` subtracted from
    :math:`\theta` above (:math:`u + \mu b` with Nesterov) is replaced, for the update
    only, by

    .. math::

        m = [\, b \odot g > 0 \,], \qquad
        b \odot m \,/\, \max(\operatorname{mean}(m), 10^{-3})

    with :math:`g` the gradient after decay and the mean over each parameter tensor
    (a reduction, not element-wise); the stored buffer stays unmasked.

    The defaults give ``torch.optim.RMSprop``'s update exactly: :math:`\epsilon` outside
    the root, no bias correction, lr outside the momentum buffer, coupled (L2) decay.
    TensorFlow, Keras, timm's ``RMSpropTF``, MindSpore and optax put :math:`\epsilon`
    inside the root and :math:`\gamma` inside the momentum buffer; TensorFlow and
    MindSpore also start :math:`v` at 1 (that is the caller's initial state).

    Args:
        params, grads, square_avgs: equal-length lists; ``params`` and ``square_avgs``
            are updated in place, ``grads`` are read only.
        grad_avgs: the mean gradients, updated in place; used when ``centered`` (may be
            empty or None otherwise).
        momentum_buffers: updated in place. When non-empty the momentum form is used (as
            torch does for ``momentum > 0``); empty or None means no momentum.
        lr, alpha, eps, weight_decay, momentum, loss_scale: Python numbers or 0-d
            tensors. A 0-d tensor is read at run time, so under ``torch.compile``
            changing it never recompiles; a Python number is a constant of the graph.
            Weight decay is skipped when it is the number 0 and the loss-scale division
            when it is the number 1; a tensor is always applied.
        centered: subtract the squared mean gradient inside the root.
        maximize: ascend instead of descend.
        eps_in_sqrt: :math:`\sqrt{w + \epsilon}` instead of :math:`\sqrt{w} + \epsilon`.
        lr_in_momentum: keep :math:`\gamma` inside the momentum buffer (the stored
            buffer is then lr-scaled, as in TensorFlow, timm and MindSpore).
        decoupled_weight_decay: shrink the params, :math:`\theta (1 - \gamma\lambda)`,
            before the update instead of adding :math:`\lambda\theta` to the gradient.
        lr_scaled_decay: with decoupled decay, ``False`` shrinks by :math:`(1 - \lambda)`
            without :math:`\gamma` (torch_npu's ``NpuFusedRMSpropTF``).
        nesterov: Nesterov momentum (needs momentum buffers), as optax's ``trace``.
        bias_correction: divide :math:`v` (and :math:`\bar g`) by :math:`1 - \alpha^t`.
        state_steps: the step count :math:`t` of each param *including* this step, as
            numbers or 0-d tensors (one per param, or a single one for all); needed only
            for ``bias_correction``. This function never increments them.
        grad_scale: AMP: the grads are multiplied by ``1 / grad_scale`` first
            (``torch.amp.GradScaler``'s unscale).
        found_inf: AMP: where it is nonzero, params and state keep their old values (the
            step is skipped without a host synchronisation).
        caution: timm's ``caution`` ("Cautious Optimizers", timm 1.0.31
            ``optim/rmsprop_tf.py`` lines 248-252 and 285-292): multiply the applied
            momentum step by the mask :math:`b g > 0`, divided by the mask's mean over
            the parameter clamped to at least 1e-3. The stored momentum buffer is not
            masked. As in timm it acts only on the momentum form: with no momentum
            buffers it does nothing. With Nesterov (which timm lacks) the mask applies
            to :math:`u + \mu b`.
        corrected_weight_decay: timm's ``corrected_weight_decay`` (rmsprop_tf.py line
            262): with decoupled, lr-scaled decay, shrink by :math:`1 -
            (\gamma^2 / \gamma_{\max})\lambda` instead of :math:`1 - \gamma\lambda`.
            Needs ``max_lr``. As in timm it does nothing with coupled decay; with
            ``lr_scaled_decay=False`` it raises.
        max_lr: :math:`\gamma_{\max}` for ``corrected_weight_decay`` (> 0; a number or
            a 0-d tensor). timm uses the lr given to the constructor (its param
            groups' ``max_lr_snapshot``).
        segment_ids, segment_sizes: for ``caution`` on flat buffers that hold several
            params back to back: per list element, ``segment_ids`` has one int64 id
            (0..k-1) per element of the element's flattened real view (2 per complex
            number) and ``segment_sizes`` the element count of each of its k segments.
            The mask mean is then taken per segment, so a flat buffer gives what the
            per-param lists give. None (the default): each list element is one param.
            Used only with ``caution``.

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
    check_options(momentum_buffers=bool(momentum_buffers), nesterov=nesterov, loss_scale=loss_scale)
    if corrected_weight_decay:
        if max_lr is None or (not _is_tensor(max_lr) and not max_lr > 0):
            raise ValueError(f"rmsprop_step: corrected_weight_decay=True needs max_lr > 0, got {max_lr}")
        if decoupled_weight_decay and not lr_scaled_decay:
            raise ValueError("rmsprop_step: corrected_weight_decay=True needs lr_scaled_decay=True")
    if caution and (segment_ids is None) != (segment_sizes is None):
        raise ValueError("rmsprop_step: give both segment_ids and segment_sizes, or neither")
    if caution and segment_ids is not None and (len(segment_ids) != n or len(segment_sizes) != n):
        raise ValueError(
            f"rmsprop_step: expected {n} segment_ids and segment_sizes, got "
            f"{len(segment_ids)} and {len(segment_sizes)}"
        )
    steps: list[Scalar] = []
    if bias_correction:
        steps = list(state_steps or [])
        if len(steps) not in (1, n):
            raise ValueError(
                f"rmsprop_step: bias_correction=True needs state_steps (1 or {n} step counts), "
                f"got {len(steps)}"
            )
        steps = steps * n if len(steps) == 1 else steps

    params = _real_views(params)
    grads = _real_views(grads)
    square_avgs = _real_views(square_avgs)
    grad_avgs = _real_views(grad_avgs)
    momentum_buffers = _real_views(momentum_buffers)

    if found_inf is not None:  # AMP: keep the old values where a grad overflowed
        mutated = params + square_avgs + grad_avgs + momentum_buffers
        saved = torch._foreach_mul(mutated, 1)

    if grad_scale is not None:
        grads = torch._foreach_mul(grads, grad_scale.reciprocal())
    if _is_tensor(loss_scale) or loss_scale != 1:
        grads = torch._foreach_div(grads, [loss_scale] * n if _is_tensor(loss_scale) else loss_scale)
    if maximize:
        grads = torch._foreach_neg(grads)
    if _is_tensor(weight_decay) or weight_decay != 0:
        if decoupled_weight_decay:
            if corrected_weight_decay:  # timm: wd_scale = lr ** 2 / max_lr
                shrink = 1 - lr**2 / max_lr * weight_decay
            else:
                shrink = 1 - lr * weight_decay if lr_scaled_decay else 1 - weight_decay
            torch._foreach_mul_(params, shrink)
        else:
            grads = torch._foreach_add(grads, torch._foreach_mul(params, weight_decay))

    # v <- alpha * v + ((1 - alpha) * g) * g
    one_minus_alpha = 1 - alpha
    scaled_sq = torch._foreach_mul(grads, one_minus_alpha)
    torch._foreach_mul_(scaled_sq, grads)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_add_(square_avgs, scaled_sq)

    mean_sq = square_avgs
    if bias_correction:
        # 1 - alpha^t in the params' precision (at least fp32): an integer step tensor
        # would otherwise be raised in the default dtype.
        corr_dtype = torch.promote_types(params[0].dtype, torch.float32)
        steps = [t.to(corr_dtype) if _is_tensor(t) else t for t in steps]
        corrections = [1 - alpha**t for t in steps]
        mean_sq = torch._foreach_div(square_avgs, corrections)
    if centered:
        # g_avg <- g_avg + (1 - alpha) * (g - g_avg): torch's lerp for weights below 0.5
        delta = torch._foreach_sub(grads, grad_avgs)
        torch._foreach_mul_(delta, one_minus_alpha)
        torch._foreach_add_(grad_avgs, delta)
        mean_g = torch._foreach_div(grad_avgs, corrections) if bias_correction else grad_avgs
        denom = torch._foreach_sub(mean_sq, torch._foreach_mul(mean_g, mean_g))
    else:
        denom = mean_sq
    if eps_in_sqrt:
        denom = torch._foreach_add(denom, [eps] * n) if _is_tensor(eps) else torch._foreach_add(denom, eps)
        denom = torch._foreach_sqrt(denom)
    else:
        denom = torch._foreach_sqrt(denom)
        _add_scalar_(denom, eps)

    neg_lr = -lr
    if momentum_buffers:
        update = torch._foreach_div(grads, denom)  # u = g / d
        if lr_in_momentum:
            torch._foreach_mul_(update, lr)  # u <- lr * u
        # b <- mu * b + u
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, update)
        step = momentum_buffers
        if nesterov:
            step = torch._foreach_add(update, torch._foreach_mul(momentum_buffers, momentum))
        if caution:
            step = _cautious(step, grads, segment_ids, segment_sizes)
        if lr_in_momentum:
            torch._foreach_sub_(params, step)
        else:
            torch._foreach_add_(params, torch._foreach_mul(step, neg_lr))
    else:
        # theta <- theta + ((-lr) * g) / d, the operation order of torch's addcdiv
        update = torch._foreach_mul(grads, neg_lr)
        torch._foreach_div_(update, denom)
        torch._foreach_add_(params, update)

    if found_inf is not None:
        skip = found_inf.to(torch.bool)
        for t, old in zip(mutated, saved):
            t.copy_(torch.where(skip, old, t))
