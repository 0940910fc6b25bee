"""Flat buffers ("tensor fusion"): one buffer per role and (param group, device, dtype).

A :class:`Bucket` owns one flat buffer for the params, one for the grads and one per
state buffer (``square_avg``, ``grad_avg``, ``momentum_buffer``), plus a flat float
buffer of step counts. Each parameter, its ``.grad`` and its state tensors are
re-pointed to views of those buffers, so one fused kernel updates the whole bucket.

The per-parameter tensors (``p``, ``p.grad``, ``optimizer.state[p][...]``) stay the
source of truth. When one of them no longer lives where the bucket put it (a fresh
``.grad`` after ``zero_grad(set_to_none=True)``, ``p.data = ...``, ``model.to()``, a
``load_state_dict``), the bucket notices by data pointer and gathers again: nothing is
silently lost, the fast path is simply the common path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
import operator
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._ownership import is_foreign, is_ours, register_flat, storage_key

__all__ = ["Bucket", "GroupLayout", "STATE_ROLES"]

#: State buffers, in the order the step receives them.
STATE_ROLES = ("square_avg", "grad_avg", "momentum_buffer")


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


def _ptrs(tensors: Iterable[Tensor]) -> tuple[int, ...]:
    return tuple(map(storage_key, tensors))


def _slot(flat: Tensor, like: Tensor, offset: int) -> Tensor:
    """A view of ``flat`` at ``offset`` with ``like``'s shape and strides.

    Valid because ``like`` is non-overlapping and dense: its strides are a permutation
    of a contiguous layout, so it covers exactly ``numel`` consecutive elements.
    """
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


def _math_view(flat: Tensor) -> Tensor:
    """The real tensor the step works on (complex numbers as pairs of reals)."""
    return torch.view_as_real(flat) if flat.is_complex() else flat


def init_state(state: dict, p: Tensor, roles: Sequence[str], initial_square_avg: float = 0.0) -> None:
    """Create torch.optim.RMSprop's state for ``p`` (lazily, as torch does); the mean
    square starts at ``initial_square_avg`` (0 in PyTorch, 1 in TensorFlow/MindSpore)."""
    if "step" not in state:
        state["step"] = torch.zeros((), dtype=_get_scalar_dtype())
    for role in roles:
        if role not in state:
            fill = initial_square_avg if role == "square_avg" else 0.0
            state[role] = torch.full_like(p, fill, memory_format=torch.preserve_format)


@dataclass
class Bucket:
    """Flat buffers for params of one device and dtype within one param group."""

    params: list[Tensor]
    roles: tuple[str, ...]
    param: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    steps: Tensor
    grad_slots: list[Tensor] = field(repr=False)
    #: The hyperparameter tensor the optimizer keeps for this bucket (see optimizer.py).
    hyper: Any = field(default=None, init=False, repr=False)
    #: The compiled step this bucket ran last, what it was chosen for, and its name
    #: (``StepKey.name()``); see ``NpuFusedRMSprop._bucket_step``.
    step_fn: Any = field(default=None, init=False, repr=False)
    step_signature: tuple = field(default=(), init=False, repr=False)
    graph: str = field(default="", init=False, repr=False)
    #: What the bucket step receives: the param, grad, square_avg, grad_avg and
    #: momentum_buffer buffers as real tensors (None for roles not in use), built once.
    step_args: list[Tensor | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def arg(flat: Tensor | None) -> Tensor | None:
            if flat is None:
                return None
            view = _math_view(flat)
            # One compiled graph for every bucket size: dim 0 is dynamic from the start.
            torch._dynamo.maybe_mark_dynamic(view, 0)
            return view

        self.step_args = [arg(self.param), arg(self.grad)] + [
            arg(self.state.get(role)) for role in STATE_ROLES
        ]

    @property
    def device(self) -> torch.device:
        return self.param.device

    @staticmethod
    def gather(params: list[Tensor], states: dict, roles: tuple[str, ...]) -> Bucket:
        """Allocate the flat buffers, copy every current tensor in, and re-point.

        ``params`` share one device and dtype and are non-overlapping and dense; their
        state dicts already hold every role in ``roles``.
        """
        first = params[0]
        total = sum(p.numel() for p in params)
        offsets = []
        offset = 0
        for p in params:
            offsets.append(offset)
            offset += p.numel()

        def new_flat() -> Tensor:
            return register_flat(torch.empty(total, dtype=first.dtype, device=first.device))

        flat_param, flat_grad = new_flat(), new_flat()
        flat_state = {role: new_flat() for role in roles}
        # Step counts: on the CPU as torch keeps them; on an accelerator, on the device,
        # so that an AMP skip (a device tensor) updates them without a synchronisation.
        steps_device = first.device if first.device.type != "cpu" else torch.device("cpu")
        steps = torch.empty(len(params), dtype=_get_scalar_dtype(), device=steps_device)
        grad_slots = []
        with torch.no_grad():
            for i, (p, off) in enumerate(zip(params, offsets)):
                st = states[p]
                view = _slot(flat_param, p, off)
                view.copy_(p)
                p.data = view
                gslot = _slot(flat_grad, p, off)
                gslot.copy_(p.grad)
                if not is_foreign(p.grad):  # else copied in before each step (_ownership.py)
                    p.grad = gslot
                grad_slots.append(gslot)
                for role in roles:
                    sview = _slot(flat_state[role], p, off)
                    sview.copy_(st[role])
                    st[role] = sview
                steps[i] = st["step"]
                st["step"] = steps[i]
        return Bucket(params, roles, flat_param, flat_grad, flat_state, steps, grad_slots)

    def owns(self, t: Tensor) -> bool:
        """Whether ``t`` lives in one of this bucket's buffers."""
        if t.numel() == 0 or t.layout != torch.strided:
            return False
        ptr = t.data_ptr()
        for flat in (self.param, self.grad, self.steps, *self.state.values()):
            start = flat.data_ptr()
            if flat.device == t.device and start <= ptr < start + flat.numel() * flat.element_size():
                return True
        return False

    def release(self, states: dict) -> None:
        """Give each tensor that still lives in this bucket's buffers (a param that left
        the bucket, its grad, its state) its own storage, so the buffers can be freed."""
        with torch.no_grad():
            for p in self.params:
                if self.owns(p):
                    p.data = p.data.clone(memory_format=torch.preserve_format)
                if p.grad is not None and self.owns(p.grad):
                    p.grad = p.grad.clone(memory_format=torch.preserve_format)
                st = states.get(p, {})
                for key, value in list(st.items()):
                    if isinstance(value, Tensor) and self.owns(value):
                        st[key] = value.clone()


def _bucket_key(p: Tensor) -> tuple:
    return (p.device, p.dtype)


def _can_flatten(p: Tensor, shared: set[int]) -> bool:
    """Whether ``p`` may be re-pointed into a flat buffer.

    Not when its storage belongs to someone else (``_ownership.is_foreign``: ZeRO's
    buckets, FSDP, tied views, a tensor the user kept) or to another param of the group
    (re-pointing would untie them silently), when its grad has another dtype (torch's
    ``grad_dtype``), or when it is not dense. Such params are updated in place with the
    per-tensor step: correct, only slower. A false "foreign" (e.g. a graph kept alive
    with retain_graph) costs speed, never correctness.
    """
    if p.numel() == 0 or is_foreign(p) or not is_non_overlapping_and_dense(p) or p.grad.dtype != p.dtype:
        return False
    return p.untyped_storage().data_ptr() not in shared


@dataclass
class GroupLayout:
    """The buckets of one param group and what they expect to find at the next step."""

    roles: tuple[str, ...]
    param_ids: tuple[int, ...]
    param_ptrs: tuple[int, ...]
    grad_ptrs: tuple[int, ...]
    buckets: list[Bucket]
    loose: list[Tensor]  # params that cannot be viewed into a flat buffer
    stale: bool = False  # set by load_state_dict: the state tensors were replaced
    state_version: int = -1  # optimizer.state's version right after this layout was built
    copies_grads: bool = False  # some grads are foreign (_ownership.py): copy them each step
    # What the whole group looked like after the last check (see ``unchanged``).
    _seen_grads: list = field(default_factory=list, repr=False)
    _seen_ptrs: tuple = field(default=(), repr=False)
    _seen_version: int = -2

    @staticmethod
    def build(
        params: list[Tensor],
        states: dict,
        roles: tuple[str, ...],
        old: GroupLayout | None,
        *,
        initial_square_avg: float = 0.0,
        split_by_step: bool = False,
    ) -> GroupLayout:
        """Gather ``params`` (those with a grad, in group order) into buckets.

        With ``split_by_step`` the params of one bucket also share their step count (bias
        correction needs one count per bucket; params that got their first grad late
        then live in a bucket of their own).
        """
        for p in params:
            init_state(states[p], p, roles, initial_square_avg)
        parts: dict[tuple, list[Tensor]] = {}
        loose = []
        # Params of the group on one storage (other than our own buffers) stay apart.
        storages = [p.untyped_storage().data_ptr() for p in params if p.numel() and not is_foreign(p) and not is_ours(p)]
        shared = {ptr for ptr in storages if storages.count(ptr) > 1}
        for p in params:
            if _can_flatten(p, shared):
                key = _bucket_key(p) + ((float(states[p]["step"]),) if split_by_step else ())
                parts.setdefault(key, []).append(p)
            else:
                loose.append(p)
        buckets = [Bucket.gather(ps, states, roles) for ps in parts.values()]
        if old is not None:  # after the gather, which may have copied from them
            for b in old.buckets:
                b.release(states)
        return GroupLayout(
            roles=roles,
            param_ids=tuple(map(id, params)),
            param_ptrs=_ptrs(params),
            grad_ptrs=_ptrs(p.grad for p in params),
            buckets=buckets,
            loose=loose,
            copies_grads=any(p.grad is not s for b in buckets for p, s in zip(b.params, b.grad_slots)),
        )

    def remember(self, state: Any, group_params: list[Tensor]) -> None:
        """Record the group as it is now (after gathering or syncing its grads)."""
        if self.copies_grads or any(is_traceable_wrapper_subclass(p) for p in group_params):
            self._seen_version = -2  # always take the full check
            return
        self._seen_grads = [p.grad for p in group_params]
        self._seen_ptrs = tuple(map(Tensor.data_ptr, group_params))
        self._seen_version = getattr(state, "version", -2)

    def unchanged(self, state: Any, roles: tuple, group_params: list[Tensor], grads: list) -> bool:
        """The fast check: same state version, roles, grad objects and param pointers."""
        return (
            not self.stale
            and roles == self.roles
            and getattr(state, "version", -1) == self._seen_version
            and len(grads) == len(self._seen_grads)
            and all(map(operator.is_, grads, self._seen_grads))
            and tuple(map(Tensor.data_ptr, group_params)) == self._seen_ptrs
        )

    def matches(self, params: list[Tensor]) -> bool:
        """Whether the same params still live where this layout put them."""
        return tuple(map(id, params)) == self.param_ids and _ptrs(params) == self.param_ptrs

    def sync_grads(self, params: list[Tensor]) -> bool:
        """Bring grads that autograd allocated anew back into the flat grad buffers.

        Returns False when that is not possible (a grad of another dtype): the caller
        gathers again.
        """
        grads = [p.grad for p in params]
        if _ptrs(grads) == self.grad_ptrs and not self.copies_grads:
            return True
        for b in self.buckets:
            moved = [(p, slot) for p, slot in zip(b.params, b.grad_slots) if p.grad.data_ptr() != slot.data_ptr()]
            if any(p.grad.dtype != slot.dtype for p, slot in moved):
                return False
            # A moved grad may itself live in a slot that this copy overwrites.
            sources = [p.grad.clone() if b.owns(p.grad) else p.grad for p, _ in moved]
            for p, slot in moved:
                if not is_foreign(p.grad):  # a grad DDP owns stays where DDP put it
                    p.grad = slot
            if moved:
                torch._foreach_copy_([slot for _, slot in moved], sources)
        return True
