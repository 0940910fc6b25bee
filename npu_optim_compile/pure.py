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

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._validation import check_hyperparameters
from .functional import rmsprop_step
from .options import RMSpropOptions, Scalar

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


#: rmsprop_step's keywords with every option at its default (built once, outside any
#: trace: rmsprop_update runs under torch.compile(fullgraph=True)).
_STEP_DEFAULTS = RMSpropOptions().step_kwargs()


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
    check_hyperparameters(momentum=momentum)
    leaves, spec = pytree.tree_flatten(params)
    _check_leaves(leaves, "params")
    device = leaves[0].device if leaves else None

    def like(fill: float) -> PyTree:
        return pytree.tree_unflatten([torch.full_like(p, fill) for p in leaves], spec)

    use_momentum = RMSpropOptions.keeps_momentum(momentum)
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
    **options: Any,
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
        options: the options of :class:`~npu_optim_compile.RMSpropOptions`, with its
            defaults (torch.optim.RMSprop's): ``lr, alpha, eps, weight_decay,
            momentum, loss_scale`` as numbers or 0-d tensors; ``centered, maximize``
            as in torch.optim.RMSprop; the variants of
            :func:`~npu_optim_compile.rmsprop_step` (``bias_correction`` uses
            ``state.step + 1`` as the step count). :func:`optax_rmsprop` maps
            ``optax.rmsprop``'s arguments onto these. ``initial_square_avg`` belongs to
            :func:`rmsprop_init`.
    """
    if not torch.compiler.is_compiling():  # values are checked once, not in a trace
        RMSpropOptions.check_keywords(options, "rmsprop_update")
        RMSpropOptions(**options)
    step_kwargs = {**_STEP_DEFAULTS, **options}
    step_kwargs.pop("initial_square_avg", None)
    centered, momentum = step_kwargs["centered"], step_kwargs["momentum"]
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
    use_momentum = RMSpropOptions.keeps_momentum(momentum)
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
    rmsprop_step(new_params, g_leaves, new_sq, new_ga, new_mb, state_steps=[state.step + 1], **step_kwargs)
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


def _update_signature() -> inspect.Signature:
    """``rmsprop_update``'s signature with every option spelled out (for ``help()``)."""
    base = inspect.signature(rmsprop_update)
    params = [p for p in base.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]
    defaults = RMSpropOptions.defaults()
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=defaults[n]) for n in _STEP_DEFAULTS]
    return base.replace(parameters=params)


rmsprop_update.__signature__ = _update_signature()
