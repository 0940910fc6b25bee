"""A pure, jax-style RMSprop over pytrees: nothing passed in is mutated.

Use it inside ``torch.compile(fullgraph=True)`` or with ``torch.func``::

    state = rmsprop_init(params)
    for batch in data:
        grads = torch.func.grad(loss_fn)(params, batch)
        params, state = rmsprop_update(params, grads, state, lr=1e-2)

``params`` and ``grads`` are pytrees (dicts, lists, tuples, nested) of tensors with the
same structure. The update math is :func:`~npu_optim_compile.rmsprop_step`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .functional import Scalar, rmsprop_step

__all__ = ["PureRMSprop", "RMSpropState", "rmsprop_init", "rmsprop_update"]

PyTree = Any


class RMSpropState(NamedTuple):
    """The state of the pure RMSprop.

    Attributes:
        step: a 0-d int64 tensor, the number of updates applied.
        square_avg: the mean square, a pytree like the params.
        grad_avg: the mean gradient (a pytree), or None when not centered.
        momentum_buffer: the momentum buffer (a pytree), or None without momentum.
    """

    step: Tensor
    square_avg: PyTree
    grad_avg: PyTree | None
    momentum_buffer: PyTree | None


def _check_nonnegative(**values: Scalar) -> None:
    for name, value in values.items():
        if not isinstance(value, Tensor) and value < 0:
            raise ValueError(f"Invalid {name} value: {value} (must be >= 0)")


def rmsprop_init(
    params: PyTree,
    *,
    momentum: Scalar = 0,
    centered: bool = False,
    initial_square_avg: float = 0.0,
) -> RMSpropState:
    """Create the state for :func:`rmsprop_update`.

    Args:
        params: a pytree of tensors.
        momentum: a momentum buffer is allocated when it is a tensor or > 0.
        centered: allocate the mean gradient.
        initial_square_avg: the starting mean square (0 in PyTorch, 1 in TensorFlow).
    """
    _check_nonnegative(momentum=momentum)
    leaves, spec = pytree.tree_flatten(params)
    _check_leaves(leaves, "params")
    device = leaves[0].device if leaves else None

    def like(fill: float) -> PyTree:
        return pytree.tree_unflatten([torch.full_like(p, fill) for p in leaves], spec)

    use_momentum = isinstance(momentum, Tensor) or momentum > 0
    return RMSpropState(
        step=torch.zeros((), dtype=torch.int64, device=device),
        square_avg=like(initial_square_avg),
        grad_avg=like(0.0) if centered else None,
        momentum_buffer=like(0.0) if use_momentum else None,
    )


def rmsprop_update(
    params: PyTree,
    grads: PyTree,
    state: RMSpropState,
    *,
    lr: Scalar = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0,
    momentum: Scalar = 0,
    centered: bool = False,
    maximize: bool = False,
    eps_in_sqrt: bool = False,
    lr_in_momentum: bool = False,
    decoupled_weight_decay: bool = False,
    nesterov: bool = False,
    bias_correction: bool = False,
    loss_scale: Scalar = 1.0,
) -> tuple[PyTree, RMSpropState]:
    r"""Return ``(new_params, new_state)`` after one RMSprop step; inputs are untouched.

    The math is :func:`~npu_optim_compile.rmsprop_step`'s (torch.optim.RMSprop's):

    .. math::

        v' = \alpha v + (1 - \alpha) g^2, \qquad
        \theta' = \theta - \gamma\, g / (\sqrt{v'} + \epsilon)

    with the centered and momentum forms as documented there. ``centered`` and the
    presence of a momentum buffer must match how ``state`` was created by
    :func:`rmsprop_init`.

    Args:
        params, grads: pytrees of tensors with the same structure.
        state: from :func:`rmsprop_init` or a previous call.
        lr, alpha, eps, weight_decay, momentum, loss_scale: numbers or 0-d tensors.
        centered, maximize: as in torch.optim.RMSprop.
        eps_in_sqrt, lr_in_momentum, decoupled_weight_decay, nesterov, bias_correction:
            the variants of :func:`~npu_optim_compile.rmsprop_step` (``bias_correction``
            uses ``state.step + 1`` as the step count). :func:`optax_rmsprop` maps
            ``optax.rmsprop``'s arguments onto these.
    """
    _check_nonnegative(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum)
    p_leaves, spec = pytree.tree_flatten(params)
    g_leaves, g_spec = pytree.tree_flatten(grads)
    if g_spec != spec:
        raise ValueError(
            "rmsprop_update: grads must have the same pytree structure as params; got "
            f"{g_spec} for grads and {spec} for params"
        )
    _check_leaves(p_leaves, "params")
    if centered and state.grad_avg is None:
        raise ValueError(
            "rmsprop_update: centered=True needs a state with grad_avg; "
            "create it with rmsprop_init(params, centered=True)"
        )
    use_momentum = isinstance(momentum, Tensor) or momentum > 0
    if use_momentum and state.momentum_buffer is None:
        raise ValueError(
            "rmsprop_update: momentum needs a state with a momentum buffer; "
            "create it with rmsprop_init(params, momentum=...)"
        )

    def leaves_of(tree: PyTree, name: str) -> list[Tensor]:
        leaves, tree_spec = pytree.tree_flatten(tree)
        if tree_spec != spec:
            raise ValueError(f"rmsprop_update: state.{name} does not match the params' structure")
        return leaves

    # Work on copies: rmsprop_step updates in place. Under torch.compile the copies fuse
    # away; in eager they cost one read and write per buffer.
    new_params = [p.clone() for p in p_leaves]
    new_sq = [t.clone() for t in leaves_of(state.square_avg, "square_avg")]
    new_ga = [t.clone() for t in leaves_of(state.grad_avg, "grad_avg")] if centered else None
    new_mb = (
        [t.clone() for t in leaves_of(state.momentum_buffer, "momentum_buffer")]
        if use_momentum
        else None
    )
    rmsprop_step(
        new_params,
        g_leaves,
        new_sq,
        new_ga,
        new_mb,
        lr=lr,
        alpha=alpha,
        eps=eps,
        weight_decay=weight_decay,
        momentum=momentum,
        centered=centered,
        maximize=maximize,
        eps_in_sqrt=eps_in_sqrt,
        lr_in_momentum=lr_in_momentum,
        decoupled_weight_decay=decoupled_weight_decay,
        nesterov=nesterov,
        bias_correction=bias_correction,
        state_steps=[state.step + 1],
        loss_scale=loss_scale,
    )
    unflatten = pytree.tree_unflatten
    new_state = RMSpropState(
        step=state.step + 1,
        square_avg=unflatten(new_sq, spec),
        grad_avg=unflatten(new_ga, spec) if centered else state.grad_avg,
        momentum_buffer=unflatten(new_mb, spec) if use_momentum else state.momentum_buffer,
    )
    return unflatten(new_params, spec), new_state


class PureRMSprop(NamedTuple):
    """A pair of pure functions, as optax's ``GradientTransformation``:
    ``state = init(params)`` and ``params, state = update(params, grads, state)``."""

    init: Callable[[PyTree], RMSpropState]
    update: Callable[[PyTree, PyTree, RMSpropState], tuple[PyTree, RMSpropState]]


def _check_leaves(leaves: list[Any], what: str) -> None:
    for leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"rmsprop: every leaf of {what} must be a Tensor, got {type(leaf).__name__}")
        if not (leaf.is_floating_point() or leaf.is_complex()):
            raise TypeError(
                f"rmsprop: {what} must be floating point or complex, got a leaf of dtype {leaf.dtype}"
            )
