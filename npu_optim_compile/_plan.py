"""The plan of one param group: which of its params a step updates, and how.

Params, grads and state stay where they are: the user's tensors and torch's state
layout (unless combined, ``_combined.py``). A plan sorts the params that have a grad
into :class:`Bucket` s, one compiled call each, and *loose* params, updated by the
per-tensor step (``rmsprop_step`` on lists, eagerly):

- a bucket holds params of one device and dtype whose grad and state tensors have the
  param's dtype, device and layout (so the compiled step can treat them element by
  element);
- params whose memory overlaps (a param listed twice, two params tied by
  ``b.data = a.data``) go to separate *rounds*, buckets run one after the other, so that
  they are updated one after the other as ``torch.optim.RMSprop`` does;
- the rest is loose: tensor subclasses (FSDP's DTensors, updated through their local
  shards), non-dense or zero-size params, a grad or state of another dtype or layout
  (``model.half()`` after the first step, a grad with its own ``grad_dtype``).

Each bucket has a *kind*, the way it runs (``_executors.py``): ``"segments"`` (CPU with
inductor: the compiled kernel over every tensor where it lives), ``"staged"`` (other
devices: the compiled step on staging copies), ``"flat"`` (a combined chunk on an
accelerator: the compiled step on the chunk's buffers).

Per step :meth:`GroupPlan.current` checks, in a few C-level passes, that the plan still
holds: the same params have a grad, params and state tensors live where they did, no
state entry was replaced, and new grads are laid out like their params. Anything else
builds a new plan, which copies nothing: params and state are read where they now are.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._combined import Chunk, Combiner
from ._ownership import storage_key
from ._tensors import DATA_PTR, init_state, is_non_overlapping_and_dense, take

__all__ = ["Bucket", "GroupPlan", "STAGED_ELEMENTS"]

_DTYPE = operator.attrgetter("dtype")
_SHAPE = operator.attrgetter("shape")

#: Most elements of one staged bucket: the staging copies are transient, and this bounds
#: them (four roles of 2**25 float32 elements: 512 MiB).
STAGED_ELEMENTS = 1 << 25

#: ``kind_of(device) -> "segments" | "staged"``: how the engine runs a device's buckets.
KindOf = Callable[[torch.device], str]


@dataclass(eq=False)
class Bucket:
    """Params of one group, device and dtype that one compiled call updates."""

    kind: str
    params: list[Tensor]
    states: list[dict]
    #: Picks this bucket's grads out of the plan's grads (those of ``GroupPlan.params``).
    take: Callable[[Sequence], tuple]
    contiguous: bool
    shapes: tuple
    strides: tuple
    dtypes: tuple
    chunk: Chunk | None = None  # the combined chunk a "flat" bucket runs on
    #: What the executors keep between steps (``_executors.py``).
    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def device(self) -> torch.device:
        return self.params[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.params[0].dtype

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def grads_fit(self, grads: Sequence[Tensor]) -> bool:
        """Whether new grads are laid out like the params (same dtype, shape and
        strides), which the compiled step relies on: a few C-level passes."""
        if tuple(map(_DTYPE, grads)) != self.dtypes or tuple(map(_SHAPE, grads)) != self.shapes:
            return False
        if self.contiguous:
            return all(map(Tensor.is_contiguous, grads))
        return tuple(map(Tensor.stride, grads)) == self.strides


_PLAIN = (Tensor, torch.nn.Parameter)


def _plain(t: object) -> bool:
    """A strided tensor that is not a tensor subclass with inner tensors (DTensor)."""
    return isinstance(t, Tensor) and (type(t) in _PLAIN or not is_traceable_wrapper_subclass(t)) and (
        t.layout == torch.strided
    )


def _fits(p: Tensor, states: dict, roles: Sequence[str], kind: str) -> bool:
    """Whether ``p`` (with its grad and state) can be in a bucket of ``kind``."""
    if not _plain(p) or p.numel() == 0 or not (p.is_contiguous() or is_non_overlapping_and_dense(p)):
        return False
    g, st = p.grad, states[p]
    like = (p.dtype, p.device, p.shape, p.stride())
    if not _plain(g) or (g.dtype, g.device, g.shape, g.stride()) != like:
        return False
    step = st.get("step")
    if not isinstance(step, Tensor) or step.numel() != 1 or step.dtype not in (torch.float32, torch.float64):
        return False
    if step.device.type == "cpu" and kind != "segments" and p.device.type != "cpu":
        return False  # an accelerator's staged step advances step counts on the device
    for r in roles:
        t = st.get(r)
        if not _plain(t) or (t.dtype, t.device, t.shape, t.stride()) != like:
            return False
    return True


def _rounds(params: Sequence[Tensor]) -> tuple[list[int], set[int]]:
    """For each param, its round: 0 unless its memory overlaps an earlier param's (in
    group order), then one more than the latest round it overlaps; and the ids of the
    params whose memory overlaps another's."""
    spans = []
    for i, p in enumerate(params):
        if _plain(p) and p.numel():
            start = p.data_ptr()
            spans.append((start, start + _extent(p), i))
    spans.sort()
    rounds = [0] * len(params)
    overlapping: set[int] = set()
    clusters: list[list[tuple[int, int, int]]] = []
    end = -1
    for span in spans:
        if span[0] < end:
            clusters[-1].append(span)
        else:
            clusters.append([span])
        end = max(end, span[1])
    for cluster in clusters:
        if len(cluster) < 2:
            continue
        cluster.sort(key=lambda s: s[2])  # group order
        for k, (start, stop, i) in enumerate(cluster):
            earlier = [rounds[j] for s, e, j in cluster[:k] if s < stop and start < e]
            rounds[i] = max(earlier) + 1 if earlier else 0
            overlapping.add(id(params[i]))
    return rounds, overlapping


def _extent(p: Tensor) -> int:
    """The bytes from ``p``'s first element to just past its last."""
    if p.is_contiguous():
        return p.numel() * p.element_size()
    span = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()) if size > 0)
    return span * p.element_size()


@dataclass(eq=False)
class GroupPlan:
    """The buckets and loose params of one param group, and where its tensors lived
    when the plan was made."""

    roles: tuple[str, ...]
    #: What the plan was made for besides the tensors (the kinds per device, ...).
    signature: tuple
    #: The group's params that have a grad, in group order; buckets and loose split them.
    params: list[Tensor]
    buckets: list[Bucket]
    loose: list[Tensor]
    #: Which of the group's params have a grad (True where p.grad is None).
    no_grad: tuple[bool, ...]
    take_params: Callable[[Sequence], tuple] = field(repr=False, default=None)
    take_loose: Callable[[Sequence], tuple] = field(repr=False, default=None)
    stale: bool = False  # set by load_state_dict: the state tensors were replaced
    state_version: int = -1  # optimizer.state's version when this plan was last checked
    _ptr: Callable[[Tensor], int | tuple] = field(default=DATA_PTR, repr=False)
    _param_ptrs: tuple = field(default=(), repr=False)  # every group param
    _state_tensors: list[Tensor] = field(default_factory=list, repr=False)
    _state_ptrs: tuple = field(default=(), repr=False)
    _loose_shapes: tuple = field(default=(), repr=False)

    @staticmethod
    def build(
        group_params: list[Tensor],
        grads: list[Tensor | None],
        states: dict,
        roles: tuple[str, ...],
        kind_of: KindOf,
        signature: tuple,
        *,
        initial_square_avg: float = 0.0,
        split_by_step: bool = False,
        combiner: Combiner | None = None,
    ) -> GroupPlan:
        """Plan the params that have a grad (in group order); create the state of those
        that have none yet (and, with a ``combiner``, combine the new ones).

        ``split_by_step``: bias correction reads one step count per staged or flat
        bucket, so their params also share their step count (segments read each
        param's own).
        """
        no_grad = tuple(g is None for g in grads)
        with_grad = [i for i, missing in enumerate(no_grad) if not missing]
        params = [group_params[i] for i in with_grad]
        for p in params:
            init_state(states[p], p, roles, initial_square_avg)
        rounds, overlapping = _rounds(params)
        if combiner is not None:
            _combine_new(combiner, params, states, roles, overlapping)
        parts: dict[tuple, list[int]] = {}
        loose: list[int] = []
        for j, p in enumerate(params):
            kind = kind_of(p.device)
            if not _fits(p, states, roles, kind):
                loose.append(j)
                continue
            key = (kind, p.device, p.dtype, rounds[j])
            if split_by_step and kind != "segments":
                key += (float(states[p]["step"]),)
            parts.setdefault(key, []).append(j)
        buckets = []
        for key, js in parts.items():
            buckets += _buckets(key[0], params, js, states, combiner)
        plan = GroupPlan(
            roles=roles,
            signature=signature,
            params=params,
            buckets=buckets,
            loose=[params[j] for j in loose],
            no_grad=no_grad,
        )
        plan.take_params = take(with_grad)
        plan.take_loose = take(loose)
        plan.remember(group_params, states)
        return plan

    def remember(self, group_params: Sequence[Tensor], states: dict) -> None:
        """Record where the group's params and this plan's state tensors live now."""
        self._state_tensors = [v for p in self.params for v in states[p].values() if isinstance(v, Tensor)]
        subclass = any(map(is_traceable_wrapper_subclass, group_params)) or any(
            map(is_traceable_wrapper_subclass, self._state_tensors)
        )
        self._ptr = storage_key if subclass else DATA_PTR
        self._param_ptrs = tuple(map(self._ptr, group_params))
        self._state_ptrs = tuple(map(self._ptr, self._state_tensors))
        self.state_version = getattr(states, "version", -1)
        self._loose_shapes = tuple(p.shape for p in self.loose)

    def current(self, states: dict, roles: tuple, signature: tuple, group_params: Sequence[Tensor], grads: list) -> bool:
        """The per-step check (module docstring): True when this plan still holds.

        When ``optimizer.state`` changed somewhere (its version moved: another group was
        planned, or an entry was replaced), this plan's own entries are compared one by
        one, and the plan stays valid if they are the same tensors.
        """
        if (
            self.stale
            or roles != self.roles
            or signature != self.signature
            or tuple(map(operator.is_, grads, repeat(None))) != self.no_grad
            or tuple(map(self._ptr, group_params)) != self._param_ptrs
            or tuple(map(self._ptr, self._state_tensors)) != self._state_ptrs
        ):
            return False
        version = getattr(states, "version", -2)
        if version != self.state_version:
            current = [v for p in self.params for v in states.get(p, {}).values() if isinstance(v, Tensor)]
            if len(current) != len(self._state_tensors) or not all(map(operator.is_, current, self._state_tensors)):
                return False
            self.state_version = version
        # New grads every step in the default loop: checked every step (holding last
        # step's grads to skip this would keep them alive after zero_grad()).
        present = self.take_params(grads)
        if not all(b.grads_fit(b.take(present)) for b in self.buckets):
            return False
        return tuple(map(_SHAPE, self.take_loose(present))) == self._loose_shapes  # else a new plan raises


def _combine_new(combiner: Combiner, params: list[Tensor], states: dict, roles, overlapping: set[int]) -> None:
    combiner.note_moves(params, combiner.slot_ptrs())
    new: dict[tuple, list[Tensor]] = {}
    for p in params:
        if combiner.eligible(p, overlapping):
            new.setdefault((p.device, p.dtype), []).append(p)
    for ps in new.values():
        combiner.combine(ps, states, roles)


def _buckets(kind: str, params: list[Tensor], js: list[int], states: dict, combiner: Combiner | None) -> list[Bucket]:
    """The buckets of one key: one for segments; for staged, the combined chunks whose
    params all take part (``"flat"``) and staging buckets of at most STAGED_ELEMENTS."""
    groups: list[tuple[str, list[int], Chunk | None]] = []
    if kind == "staged" and combiner is not None:
        present = {id(params[j]): j for j in js}
        for chunk in combiner.chunks:
            members = [present.get(id(p)) for p in chunk.params]
            if (
                all(j is not None for j in members)
                and chunk.in_place()
                and members == sorted(members)
                and all(chunk.holds_state(i, states[p]) for i, p in enumerate(chunk.params))
            ):
                groups.append(("flat", members, chunk))
                taken = set(members)
                js = [j for j in js if j not in taken]
    if kind == "staged":
        run: list[int] = []
        size = 0
        for j in js:
            n = params[j].numel()
            if run and size + n > STAGED_ELEMENTS:
                groups.append((kind, run, None))
                run, size = [], 0
            run.append(j)
            size += n
        if run:
            groups.append((kind, run, None))
    else:
        groups.append((kind, js, None))
    out = []
    for k, members, chunk in groups:
        ps = [params[j] for j in members]
        out.append(
            Bucket(
                kind=k,
                params=ps,
                states=[states[p] for p in ps],
                take=take(members),
                contiguous=all(p.is_contiguous() for p in ps),
                shapes=tuple(p.shape for p in ps),
                strides=tuple(p.stride() for p in ps),
                dtypes=tuple(p.dtype for p in ps),
                chunk=chunk,
            )
        )
    return out
