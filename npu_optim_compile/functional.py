"""The functional RMSprop step: the one source of the update math in this library.

Everything else (the stateful :class:`~npu_optim_compile.NpuFusedRMSprop`, the pure
:func:`~npu_optim_compile.rmsprop_update`) calls :func:`rmsprop_step`. It is a short
driver over named private stages, each a few ``torch._foreach_*`` ops, run in this
order (the order of the traced graph, which the foreach-fusion pass and the compiled
kernels see): the gradient (loss scale, sign), the weight decay, the second moment, the
denominator (bias correction, the centered mean gradient, eps), the momentum (with
caution) or the plain update, and AMP's skip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._validation import check_option_combination
from .options import Scalar

__all__ = ["rmsprop_step"]


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
    found_inf: Tensor | None = None,
    caution: bool = False,
    corrected_weight_decay: bool = False,
    max_lr: Scalar | None = None,
    segment_ids: Sequence[Tensor] | None = None,
    segment_sizes: Sequence[Tensor] | None = None,
    op_order: str = "torch",
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
        op_order: the order of operations, which decides how fp32 rounds (the
            values are equal in exact arithmetic). ``"torch"``: torch.optim.RMSprop's,
            :math:`v \leftarrow \alpha v + ((1 - \alpha) g) g` (its ``addcmul``),
            :math:`\bar g \leftarrow \bar g + (1 - \alpha)(g - \bar g)` (its ``lerp``
            for :math:`1 - \alpha < 0.5`), :math:`u = \gamma (g / d)` with lr in
            momentum. ``"tf"``: TensorFlow's, which timm 1.0.31 (``optim/rmsprop_tf.py``
            lines 268 and 282), torch_npu (``optim/npu_fused_rmsprop_tf.py``) and
            MindSpore 2.10.0 (``rmsprop_cpu_kernel.cc``) follow: :math:`v \leftarrow v +
            (1 - \alpha)(g g - v)` and :math:`u = (\gamma g) / d` (their ``addcdiv``).
            ``"optax"``: optax's moments (``optax/tree_utils/_tree_math.py``,
            ``tree_update_moment*``): :math:`v \leftarrow (1 - \alpha)(g g) + \alpha v`,
            :math:`\bar g \leftarrow (1 - \alpha) g + \alpha \bar g`.

    Complex tensors are updated as pairs of real numbers (``torch.view_as_real``), as
    torch.optim.RMSprop does. The function is traceable by
    ``torch.compile(fullgraph=True)`` with no graph break. Option errors read as
    :class:`~npu_optim_compile.RMSpropOptions`' (``_validation.py``).
    """
    n = len(params)
    if n == 0:
        return
    grad_avgs = [] if grad_avgs is None else list(grad_avgs)
    momentum_buffers = [] if momentum_buffers is None else list(momentum_buffers)
    _check_lengths(n, grads, square_avgs, grad_avgs, momentum_buffers, centered)
    # len(...) > 0, not bool(list): Dynamo (torch 2.11) cannot trace bool() of a list
    has_momentum = len(momentum_buffers) > 0
    check_option_combination(
        momentum_buffers=has_momentum,
        nesterov=nesterov,
        loss_scale=loss_scale,
        corrected_weight_decay=corrected_weight_decay,
        max_lr=max_lr,
        lr_scaled_decay=lr_scaled_decay,
    )
    if caution:
        _check_segments(n, segment_ids, segment_sizes)
    steps = _step_counts(n, state_steps) if bias_correction else []

    params = _real_views(params)
    grads = _real_views(grads)
    square_avgs = _real_views(square_avgs)
    grad_avgs = _real_views(grad_avgs)
    momentum_buffers = _real_views(momentum_buffers)

    if found_inf is not None:  # AMP: keep the old values where a grad overflowed
        mutated = params + square_avgs + grad_avgs + momentum_buffers
        saved = torch._foreach_mul(mutated, 1)

    grads = _scaled_grads(grads, loss_scale, maximize)
    grads = _decay(
        params, grads, lr, weight_decay,
        decoupled=decoupled_weight_decay, lr_scaled=lr_scaled_decay, corrected=corrected_weight_decay, max_lr=max_lr,
    )
    one_minus_alpha = 1 - alpha
    _second_moment(square_avgs, grads, alpha, one_minus_alpha, op_order)
    corrections = _bias_corrections(alpha, steps, params[0].dtype) if bias_correction else None
    denom = _denominator(square_avgs, grad_avgs, grads, alpha, one_minus_alpha, corrections, eps,
                         centered=centered, eps_in_sqrt=eps_in_sqrt, op_order=op_order)
    neg_lr = -lr
    if has_momentum:
        step = _momentum(momentum_buffers, grads, denom, lr, momentum, lr_in_momentum=lr_in_momentum,
                         nesterov=nesterov, op_order=op_order)
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
        _keep_where_skipped(found_inf, mutated, saved)


# -- the stages of rmsprop_step, in order -------------------------------------------------


def _check_lengths(n, grads, square_avgs, grad_avgs, momentum_buffers, centered: bool) -> None:
    if len(grads) != n or len(square_avgs) != n:
        raise ValueError(
            f"rmsprop_step: params, grads and square_avgs must have the same length; got "
            f"{n}, {len(grads)} and {len(square_avgs)}"
        )
    if centered and len(grad_avgs) != n:
        raise ValueError(f"rmsprop_step: centered=True needs {n} grad_avgs, got {len(grad_avgs)}")
    if len(momentum_buffers) > 0 and len(momentum_buffers) != n:
        raise ValueError(
            f"rmsprop_step: expected {n} momentum_buffers (or none), got {len(momentum_buffers)}"
        )


def _check_segments(n: int, segment_ids, segment_sizes) -> None:
    if (segment_ids is None) != (segment_sizes is None):
        raise ValueError("rmsprop_step: give both segment_ids and segment_sizes, or neither")
    if segment_ids is not None and (len(segment_ids) != n or len(segment_sizes) != n):
        raise ValueError(
            f"rmsprop_step: expected {n} segment_ids and segment_sizes, got "
            f"{len(segment_ids)} and {len(segment_sizes)}"
        )


def _step_counts(n: int, state_steps: Sequence[Scalar] | None) -> list[Scalar]:
    """One step count per param for bias correction (a single one is repeated)."""
    steps = [] if state_steps is None else list(state_steps)
    if len(steps) not in (1, n):
        raise ValueError(
            f"rmsprop_step: bias_correction=True needs state_steps (1 or {n} step counts), got {len(steps)}"
        )
    return steps * n if len(steps) == 1 else steps


def _scaled_grads(grads: list[Tensor], loss_scale: Scalar, maximize: bool) -> list[Tensor]:
    """:math:`g / s`, negated with ``maximize`` (new tensors; the inputs stay as they are)."""
    if _is_tensor(loss_scale) or loss_scale != 1:
        grads = torch._foreach_div(grads, [loss_scale] * len(grads) if _is_tensor(loss_scale) else loss_scale)
    if maximize:
        grads = torch._foreach_neg(grads)
    return grads


def _decay(
    params: list[Tensor],
    grads: list[Tensor],
    lr: Scalar,
    weight_decay: Scalar,
    *,
    decoupled: bool,
    lr_scaled: bool,
    corrected: bool,
    max_lr: Scalar | None,
) -> list[Tensor]:
    r"""Weight decay: :math:`g + \lambda\theta` (the new grads are returned), or,
    decoupled, the params shrunk in place by :math:`1 - \gamma\lambda`,
    :math:`1 - \lambda` (not lr-scaled) or :math:`1 - (\gamma^2/\gamma_{\max})\lambda`
    (corrected). Nothing when ``weight_decay`` is the number 0."""
    if not (_is_tensor(weight_decay) or weight_decay != 0):
        return grads
    if not decoupled:
        return torch._foreach_add(grads, torch._foreach_mul(params, weight_decay))
    if corrected:  # timm: wd_scale = lr ** 2 / max_lr
        shrink = 1 - lr**2 / max_lr * weight_decay
    else:
        shrink = 1 - lr * weight_decay if lr_scaled else 1 - weight_decay
    torch._foreach_mul_(params, shrink)
    return grads


def _second_moment(
    square_avgs: list[Tensor], grads: list[Tensor], alpha: Scalar, one_minus_alpha: Scalar, op_order: str
) -> None:
    r""":math:`v \leftarrow \alpha v + (1 - \alpha) g^2`, in place, in ``op_order``'s order."""
    if op_order == "tf":  # v <- v + (1 - alpha) * (g * g - v)
        diff = torch._foreach_mul(grads, grads)
        torch._foreach_sub_(diff, square_avgs)
        torch._foreach_mul_(diff, one_minus_alpha)
        torch._foreach_add_(square_avgs, diff)
        return
    if op_order == "optax":  # v <- (1 - alpha) * (g * g) + alpha * v
        scaled_sq = torch._foreach_mul(grads, grads)
        torch._foreach_mul_(scaled_sq, one_minus_alpha)
    else:  # torch's addcmul: v <- alpha * v + ((1 - alpha) * g) * g
        scaled_sq = torch._foreach_mul(grads, one_minus_alpha)
        torch._foreach_mul_(scaled_sq, grads)
    torch._foreach_mul_(square_avgs, alpha)
    torch._foreach_add_(square_avgs, scaled_sq)


def _bias_corrections(alpha: Scalar, steps: list[Scalar], dtype: torch.dtype) -> list[Scalar]:
    r""":math:`1 - \alpha^t` per param, in the params' precision (at least fp32): an
    integer step tensor would otherwise be raised in the default dtype."""
    corr_dtype = torch.promote_types(dtype, torch.float32)
    steps = [t.to(corr_dtype) if _is_tensor(t) else t for t in steps]
    return [1 - alpha**t for t in steps]


def _first_moment(
    grad_avgs: list[Tensor], grads: list[Tensor], alpha: Scalar, one_minus_alpha: Scalar, op_order: str
) -> None:
    r""":math:`\bar g \leftarrow \alpha \bar g + (1 - \alpha) g`, in place, in ``op_order``'s order."""
    if op_order == "optax":  # g_avg <- (1 - alpha) * g + alpha * g_avg
        torch._foreach_mul_(grad_avgs, alpha)
        torch._foreach_add_(grad_avgs, torch._foreach_mul(grads, one_minus_alpha))
        return
    # torch's lerp for weights below 0.5, and TensorFlow's: g_avg <- g_avg + (1 - alpha) * (g - g_avg)
    delta = torch._foreach_sub(grads, grad_avgs)
    torch._foreach_mul_(delta, one_minus_alpha)
    torch._foreach_add_(grad_avgs, delta)


def _denominator(
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    grads: list[Tensor],
    alpha: Scalar,
    one_minus_alpha: Scalar,
    corrections: list[Scalar] | None,
    eps: Scalar,
    *,
    centered: bool,
    eps_in_sqrt: bool,
    op_order: str,
) -> list[Tensor]:
    r""":math:`d`: the root of the (bias-corrected) mean square, less the squared mean
    gradient when centered (which first updates the mean gradient in place), with
    :math:`\epsilon` added outside or inside the root."""
    mean_sq = square_avgs if corrections is None else torch._foreach_div(square_avgs, corrections)
    if centered:
        _first_moment(grad_avgs, grads, alpha, one_minus_alpha, op_order)
        mean_g = grad_avgs if corrections is None else torch._foreach_div(grad_avgs, corrections)
        denom = torch._foreach_sub(mean_sq, torch._foreach_mul(mean_g, mean_g))
    else:
        denom = mean_sq
    if eps_in_sqrt:
        denom = torch._foreach_add(denom, [eps] * len(denom)) if _is_tensor(eps) else torch._foreach_add(denom, eps)
        return torch._foreach_sqrt(denom)
    denom = torch._foreach_sqrt(denom)
    _add_scalar_(denom, eps)
    return denom


def _momentum(
    momentum_buffers: list[Tensor],
    grads: list[Tensor],
    denom: list[Tensor],
    lr: Scalar,
    momentum: Scalar,
    *,
    lr_in_momentum: bool,
    nesterov: bool,
    op_order: str,
) -> list[Tensor]:
    r""":math:`b \leftarrow \mu b + u` in place, with :math:`u = g / d` (times
    :math:`\gamma` with lr in momentum); returns the step to apply: :math:`b`, or
    :math:`u + \mu b` with Nesterov."""
    if lr_in_momentum and op_order == "tf":  # u = (lr * g) / d, TensorFlow's order
        update = torch._foreach_mul(grads, lr)
        torch._foreach_div_(update, denom)
    else:
        update = torch._foreach_div(grads, denom)  # u = g / d
        if lr_in_momentum:
            torch._foreach_mul_(update, lr)  # u <- lr * u
    torch._foreach_mul_(momentum_buffers, momentum)
    torch._foreach_add_(momentum_buffers, update)
    if nesterov:
        return torch._foreach_add(update, torch._foreach_mul(momentum_buffers, momentum))
    return momentum_buffers


def _keep_where_skipped(found_inf: Tensor, mutated: list[Tensor], saved: list[Tensor]) -> None:
    """AMP's skip: where ``found_inf`` is nonzero every mutated tensor gets its saved
    value back (no host synchronisation)."""
    skip = found_inf.to(torch.bool)
    for t, old in zip(mutated, saved):
        t.copy_(torch.where(skip, old, t))
