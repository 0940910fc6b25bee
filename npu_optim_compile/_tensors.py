"""Small facts about tensors that the plan and the executors share.

Nothing here keeps state: what a step may assume about a param, its grad and its state
tensors, checked the way torch.optim.RMSprop would fail, and torch's state layout.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from ._validation import check_param_dtype, check_sparse

__all__ = [
    "DATA_PTR",
    "GRAD",
    "check_grads",
    "grad_pointers",
    "init_state",
    "is_non_overlapping_and_dense",
    "math_view",
    "take",
]

DATA_PTR = Tensor.data_ptr
GRAD = operator.attrgetter("grad")


def take(indices: Sequence[int]) -> Callable[[Sequence], tuple]:
    """``lambda xs: tuple(xs[i] for i in indices)``, in C."""
    if not indices:
        return lambda xs: ()
    if len(indices) == 1:
        (i,) = indices
        return lambda xs: (xs[i],)
    return operator.itemgetter(*indices)


def is_non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill ``numel`` consecutive slots (any dim order)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def math_view(t: Tensor) -> Tensor:
    """The real tensor the step works on (complex numbers as pairs of reals)."""
    return torch.view_as_real(t) if t.is_complex() else t


def init_state(state: dict, p: Tensor, roles: Sequence[str], initial_square_avg: float = 0.0) -> None:
    """Create torch.optim.RMSprop's state for ``p`` (lazily, as torch does: its own
    tensors, laid out like ``p``); the mean square starts at ``initial_square_avg``
    (0 in PyTorch, 1 in TensorFlow/MindSpore). The step count is a 0-d CPU tensor, as
    torch keeps it, except for params on an accelerator, where it lives on the device
    so that an AMP skip (a device flag) advances it without a host synchronisation."""
    if "step" not in state:
        device = p.device if p.device.type not in ("cpu", "meta") else torch.device("cpu")
        state["step"] = torch.zeros((), dtype=_get_scalar_dtype(), device=device)
    for role in roles:
        if role not in state:
            fill = initial_square_avg if role == "square_avg" else 0.0
            state[role] = torch.full_like(p, fill, memory_format=torch.preserve_format)


def grad_pointers(grads: Sequence[Tensor]) -> tuple[int, ...]:
    """The grads' data pointers; torch's error for a sparse grad (which has none)."""
    try:
        return tuple(map(DATA_PTR, grads))
    except RuntimeError:
        for g in grads:
            check_sparse(g)
        raise


def check_grads(params: Sequence[Tensor], group_index: int) -> None:
    """What torch.optim.RMSprop refuses, checked before anything is changed."""
    for i, p in enumerate(params):
        g = p.grad
        check_sparse(g)
        check_param_dtype(p)
        if g.shape != p.shape:
            raise RuntimeError(
                f"param group {group_index}, parameter {i}: grad of shape {tuple(g.shape)} for a "
                f"parameter of shape {tuple(p.shape)}: the grad's storage was replaced (.data = / "
                "set_) by one of another shape"
            )
