"""Flat buffers ("tensor fusion"): one buffer per role and (param group, device, dtype).

A :class:`Bucket` owns one flat buffer for the params, one for the grads, one per state
buffer (``square_avg``, ``grad_avg``, ``momentum_buffer``) and a flat float buffer of
step counts. Each parameter and its state tensors are re-pointed to views of those
buffers, so one fused kernel updates the whole bucket.

Grads are never re-pointed by a step (PyTorch's contract: ``step()`` leaves each
``p.grad`` object and its autograd version untouched). Before each step the bucket
gathers the grads that do not already live in their slot of the flat grad buffer with
a few C-level copies (one ``torch.stack`` per run of same-shape params); ``zero_grad(set_to_none=False)``, where torch itself writes into the
grads, re-points them into their slots (``NpuFusedRMSprop.zero_grad``), after which
backward accumulates straight into the flat buffer and the copy is skipped.

The per-parameter tensors (``p``, ``p.grad``, ``optimizer.state[p][...]``) stay the
source of truth. :class:`GroupLayout` records where each of them lived after the last
step; when one of them moved (``p.data = ...``, ``model.to()``, ``x.data = ...`` or
``x.set_(...)`` on a state tensor, a ``load_state_dict``), the group is gathered again
from the per-parameter tensors: nothing is silently lost.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import compress, repeat

import torch
from torch import Tensor
from torch.optim.optimizer import _get_scalar_dtype

from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._ownership import is_foreign, is_ours, register_flat, storage_key
from ._validation import check_param_dtype, check_sparse
from .options import STATE_ROLES

__all__ = ["Bucket", "GroupLayout", "init_state", "take"]

_DATA_PTR = Tensor.data_ptr
_GRAD = operator.attrgetter("grad")


def take(indices: Sequence[int]) -> Callable[[Sequence], tuple]:
    """``lambda xs: tuple(xs[i] for i in indices)``, in C."""
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


@dataclass(eq=False)
class Bucket:
    """Flat buffers for the params of one device and dtype within one param group."""

    params: list[Tensor]
    #: Positions of ``params`` among the group's params that have a grad.
    indices: tuple[int, ...]
    roles: tuple[str, ...]
    param: Tensor
    grad: Tensor
    state: dict[str, Tensor]
    steps: Tensor
    #: Each param's slot in ``grad`` (zero_grad(set_to_none=False) makes p.grad a view of it).
    slots: list[Tensor] = field(repr=False)
    #: What the compiled step receives: the param, grad, square_avg, grad_avg and
    #: momentum_buffer buffers as real tensors (None for roles not in use).
    step_args: list[Tensor | None] = field(init=False, repr=False)
    slot_ptrs: tuple[int, ...] = field(init=False, repr=False)
    take_grads: Callable[[Sequence], tuple] = field(init=False, repr=False)
    #: Which param each element of the real flat view belongs to (timm's caution takes
    #: a mean per param), built on first use: ``(segment_ids, segment_sizes)``.
    segments: tuple[Tensor, Tensor] | None = field(default=None, init=False, repr=False)
    #: Runs of contiguous params of one shape: ``(start, end, shape, out)`` where ``out``
    #: is the flat grad buffer's part for ``params[start:end]`` viewed as
    #: ``(end - start, *shape)``: their grads are gathered with one ``torch.stack``.
    runs: list[tuple[int, int, torch.Size, Tensor]] = field(init=False, repr=False)
    #: Positions of the params outside every run (gathered with one foreach copy).
    others: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def arg(flat: Tensor | None) -> Tensor | None:
            if flat is None:
                return None
            view = _math_view(flat)
            # One compiled graph for every bucket size: dim 0 is dynamic from the start.
            torch._dynamo.maybe_mark_dynamic(view, 0)
            return view

        self.step_args = [arg(self.param), arg(self.grad)] + [arg(self.state.get(role)) for role in STATE_ROLES]
        self.slot_ptrs = tuple(map(_DATA_PTR, self.slots))
        self.take_grads = take(self.indices)
        self.runs, others, offset, i = [], [], 0, 0
        while i < len(self.params):
            key = _run_key(self.params[i])
            j = i + 1
            while key[0] == 0 and j < len(self.params) and _run_key(self.params[j]) == key:
                j += 1
            shape, numel = self.params[i].shape, self.params[i].numel()
            if key[0] == 0:
                out = self.grad[offset : offset + (j - i) * numel].view(j - i, *shape)
                self.runs.append((i, j, shape, out))
            else:
                others.extend(range(i, j))
            offset += (j - i) * numel
            i = j
        self.others = tuple(others)

    @property
    def device(self) -> torch.device:
        return self.param.device

    @property
    def numel(self) -> int:
        return self.param.numel()


    @staticmethod
    def gather(params: list[Tensor], indices: tuple[int, ...], states: dict, roles: tuple[str, ...]) -> Bucket:
        """Allocate the flat buffers, copy params and state in, and re-point them.

        ``params`` share one device and dtype and are non-overlapping and dense; their
        state dicts already hold every role in ``roles``. Grads are not touched.

        The params are laid out with contiguous params of one shape next to each other
        (see :attr:`runs`), the others after them; ``indices`` follow the new order.
        """
        order = sorted(range(len(params)), key=lambda i: _run_key(params[i]) + (i,))
        params = [params[i] for i in order]
        indices = tuple(indices[i] for i in order)
        first = params[0]
        total = sum(p.numel() for p in params)

        def new_flat() -> Tensor:
            return register_flat(torch.empty(total, dtype=first.dtype, device=first.device))

        flat_param, flat_grad = new_flat(), new_flat()
        flat_state = {role: new_flat() for role in roles}
        # Step counts: on the CPU as torch keeps them; on an accelerator, on the device,
        # so that an AMP skip (a device tensor) updates them without a synchronisation.
        steps_device = first.device if first.device.type != "cpu" else torch.device("cpu")
        steps = torch.empty(len(params), dtype=_get_scalar_dtype(), device=steps_device)
        slots = []
        offset = 0
        with torch.no_grad():
            for i, p in enumerate(params):
                st = states[p]
                view = _slot(flat_param, p, offset)
                view.copy_(p)
                p.data = view
                slots.append(_slot(flat_grad, p, offset))
                for role in roles:
                    sview = _slot(flat_state[role], p, offset)
                    sview.copy_(st[role])
                    st[role] = sview
                steps[i] = st["step"]
                st["step"] = steps[i]
                offset += p.numel()
        return Bucket(params, indices, roles, flat_param, flat_grad, flat_state, steps, slots)

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

    def load_grads(self, grads: Sequence[Tensor], ptrs: Sequence[int]) -> None:
        """Make the flat grad buffer hold ``grads`` (this bucket's params' ``.grad``): a
        few C-level copies of those that do not live in their slot (see
        :meth:`_gather_all`), none when all do.

        The copy does not bump the autograd version the slots share: a grad that lives
        in its slot (after ``zero_grad(set_to_none=False)``) is never written by a step.
        ``ptrs``: the grads' data pointers. Raises ``RuntimeError`` for a grad whose
        shape differs from its param's.
        """
        if ptrs == self.slot_ptrs:
            return
        moved = list(map(operator.ne, ptrs, self.slot_ptrs))
        lo, hi = self.grad.data_ptr(), self.grad.data_ptr() + self.grad.numel() * self.grad.element_size()
        if min(ptrs) < hi and max(ptrs) >= lo and any(lo <= q < hi for q in compress(ptrs, moved)):
            # A grad that lives in another param's slot, which this copy overwrites.
            grads = tuple(g.clone() if m and lo <= g.data_ptr() < hi else g for g, m in zip(grads, moved))
        with torch._C._AutoDispatchBelowADInplaceOrView():
            if all(moved):  # the default loop: every grad is autograd's new tensor
                self._gather_all(grads)
            else:
                slots, sources = list(compress(self.slots, moved)), list(compress(grads, moved))
                self._copy(slots, sources, grads)

    def _gather_all(self, grads: Sequence[Tensor]) -> None:
        """Copy every grad in: one ``torch.stack`` per run of same-shape params (half the
        per-tensor cost of a foreach copy for small tensors, measured), one foreach copy
        for the rest. ``stack`` refuses grads of unequal shapes; the first of each run is
        compared with its param's."""
        for start, end, shape, out in self.runs:
            if grads[start].shape != shape:
                self._check_grad_shapes(grads)
            try:
                torch.stack(grads[start:end], out=out)
            except RuntimeError:
                self._check_grad_shapes(grads)
                raise
        if self.others:
            self._copy([self.slots[i] for i in self.others], [grads[i] for i in self.others], grads)

    def _copy(self, slots: list[Tensor], sources: list[Tensor], grads: Sequence[Tensor]) -> None:
        try:
            torch._foreach_copy_(slots, sources)
        except RuntimeError:
            self._check_grad_shapes(grads)
            raise
        # copy_ broadcasts: a smaller grad of another shape would fill its slot silently.
        if sum(map(Tensor.numel, sources)) != sum(map(Tensor.numel, slots)):
            self._check_grad_shapes(grads)

    @staticmethod
    def slot_view(slot: Tensor) -> Tensor:
        """A new view of a grad slot, to hand out as ``p.grad``: the bucket's own slot
        objects are never handed out, so ``p.grad.data = t`` or ``p.grad.set_(t)`` by the
        user cannot move them."""
        return slot.as_strided(slot.shape, slot.stride(), slot.storage_offset())

    def _check_grad_shapes(self, grads: Sequence[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            if g.shape != p.shape:
                raise RuntimeError(
                    f"a grad of shape {tuple(g.shape)} for a parameter of shape {tuple(p.shape)}: "
                    "the grad's storage was replaced (.data = / set_) by one of another shape"
                )

    def release(self, states: dict) -> None:
        """Give each param that still lives in this bucket's buffers, and its state, its
        own storage, so the buffers can be freed. Grads are the user's and stay as they
        are (a grad in an old slot keeps only the old grad buffer alive, until the next
        ``zero_grad``)."""
        with torch.no_grad():
            for p in self.params:
                if self.owns(p):
                    p.data = p.data.clone(memory_format=torch.preserve_format)
                st = states.get(p)
                if not isinstance(st, dict):
                    continue
                for key, value in list(st.items()):
                    if isinstance(value, Tensor) and self.owns(value):
                        st[key] = value.clone()


def _run_key(p: Tensor) -> tuple:
    """Params with equal keys form a run (see ``Bucket.runs``): contiguous ones by
    shape; any other param has a key of its own."""
    return (0, tuple(p.shape)) if p.is_contiguous() else (1, id(p))


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


def grad_pointers(grads: Sequence[Tensor], group_index: int) -> tuple[int, ...]:
    """The grads' data pointers; torch's error for a sparse grad (which has none)."""
    try:
        return tuple(map(_DATA_PTR, grads))
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
                f"parameter of shape {tuple(p.shape)}"
            )


@dataclass(eq=False)
class GroupLayout:
    """The buckets of one param group and where its tensors lived after the last step."""

    roles: tuple[str, ...]
    #: The group's params that have a grad, in group order; buckets and loose split them.
    params: list[Tensor]
    buckets: list[Bucket]
    loose: list[Tensor]  # params that cannot be views of a flat buffer
    #: Which of the group's params have a grad (True where p.grad is None).
    no_grad: tuple[bool, ...]
    stale: bool = False  # set by load_state_dict: the state tensors were replaced
    state_version: int = -1  # optimizer.state's version when this layout was last checked
    take_params: Callable[[Sequence], tuple] = field(repr=False, default=None)
    take_loose: Callable[[Sequence], tuple] = field(repr=False, default=None)
    #: ``Tensor.data_ptr``, or ``storage_key`` where tensor subclasses (DTensor) take part.
    _ptr: Callable[[Tensor], int | tuple] = field(default=_DATA_PTR, repr=False)
    _param_ptrs: tuple = field(default=(), repr=False)  # every group param
    _state_tensors: list[Tensor] = field(default_factory=list, repr=False)
    _state_ptrs: tuple = field(default=(), repr=False)

    @staticmethod
    def build(
        group_params: list[Tensor],
        grads: list[Tensor | None],
        states: dict,
        roles: tuple[str, ...],
        old: GroupLayout | None,
        *,
        initial_square_avg: float = 0.0,
        split_by_step: bool = False,
    ) -> GroupLayout:
        """Gather the params that have a grad (in group order) into buckets.

        With ``split_by_step`` the params of one bucket also share their step count (bias
        correction needs one count per bucket; params that got their first grad late
        then live in a bucket of their own).
        """
        no_grad = tuple(g is None for g in grads)
        with_grad = [i for i, missing in enumerate(no_grad) if not missing]
        params = [group_params[i] for i in with_grad]
        for p in params:
            init_state(states[p], p, roles, initial_square_avg)
        parts: dict[tuple, list[int]] = {}
        loose: list[int] = []
        # Params of the group on one storage (other than our own buffers) stay apart.
        storages = [p.untyped_storage().data_ptr() for p in params if p.numel() and not is_foreign(p) and not is_ours(p)]
        shared = {ptr for ptr in storages if storages.count(ptr) > 1}
        for j, p in enumerate(params):
            if _can_flatten(p, shared):
                key = (p.device, p.dtype) + ((float(states[p]["step"]),) if split_by_step else ())
                parts.setdefault(key, []).append(j)
            else:
                loose.append(j)
        buckets = [Bucket.gather([params[j] for j in js], tuple(js), states, roles) for js in parts.values()]
        if old is not None:  # after the gather, which may have copied from them
            for b in old.buckets:
                b.release(states)
        layout = GroupLayout(
            roles=roles, params=params, buckets=buckets, loose=[params[j] for j in loose], no_grad=no_grad
        )
        layout.take_params = take(with_grad) if with_grad else (lambda xs: ())
        layout.take_loose = take(loose) if loose else (lambda xs: ())
        layout.remember(group_params, states)
        return layout

    def remember(self, group_params: Sequence[Tensor], states: dict) -> None:
        """Record where the group's params and this layout's state tensors live now."""
        self._state_tensors = [v for p in self.params for v in states[p].values() if isinstance(v, Tensor)]
        subclass = any(map(is_traceable_wrapper_subclass, group_params)) or any(
            map(is_traceable_wrapper_subclass, self._state_tensors)
        )
        self._ptr = storage_key if subclass else _DATA_PTR
        self._param_ptrs = tuple(map(self._ptr, group_params))
        self._state_ptrs = tuple(map(self._ptr, self._state_tensors))
        self.state_version = getattr(states, "version", -1)

    def unchanged(self, states: dict, roles: tuple, group_params: Sequence[Tensor], grads: list) -> bool:
        """The per-step check, a few C-level passes: the same params have a grad, every
        param and every state tensor still lives where it did (which catches ``.data``
        swaps and ``set_`` too), and no state entry was replaced.

        When ``optimizer.state`` changed somewhere (its version moved: another group was
        gathered, or an entry was replaced), this layout's own entries are compared one
        by one, and the layout stays valid if they are the same tensors.
        """
        if (
            self.stale
            or roles != self.roles
            or tuple(map(operator.is_, grads, repeat(None))) != self.no_grad
            or tuple(map(self._ptr, group_params)) != self._param_ptrs
            or tuple(map(self._ptr, self._state_tensors)) != self._state_ptrs
        ):
            return False
        version = getattr(states, "version", -2)
        if version == self.state_version:
            return True
        current = [v for p in self.params for v in states.get(p, {}).values() if isinstance(v, Tensor)]
        if len(current) != len(self._state_tensors) or not all(map(operator.is_, current, self._state_tensors)):
            return False
        self.state_version = version
        return True
