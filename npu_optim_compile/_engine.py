"""The step engine: what ``NpuFusedRMSprop.step()`` runs, apart from the Optimizer facade.

One :class:`StepEngine` per optimizer keeps, per param group, a :class:`GroupLayout`
(the flat buckets and the params that stay loose) and, per bucket, the compiled step and
its hyperparameter tensor. A step goes in four phases, so that a step that raises
changes nothing:

1. **prepare** every group: the cheap per-step check (``GroupLayout.unchanged``) or,
   when something moved, validation and a new gather;
2. **resolve** the compiled step of every bucket; a structure seen for the first time
   is compiled on scratch buffers first (a compile that fails fails here);
3. **unscale** the grads in place under a GradScaler (what its ``unscale_`` does);
4. **run**: copy the grads that do not live in their slot into the flat grad buffer,
   call the compiled step per bucket, the per-tensor step for loose params, and only
   then advance the step counts.

Inside a user's ``torch.compile`` the same engine runs behind one custom op
(``_in_compile.py``).
"""

from __future__ import annotations

import contextlib
import operator
from itertools import repeat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._bucket_step import HyperTensor, StepKey, get_bucket_step, segments_like
from ._buckets import Bucket, GroupLayout, check_grads, grad_pointers
from ._dump import bucket_context
from ._ownership import is_foreign, local_tensors
from ._state import TrackedState
from .functional import rmsprop_step
from .options import RMSpropOptions

__all__ = ["StepEngine", "Amp"]

_GRAD = operator.attrgetter("grad")


@dataclass(frozen=True)
class Amp:
    """What a GradScaler hands the step: its scale (None when the grads are already
    unscaled) and its found-inf flag."""

    grad_scale: Tensor | None
    found_inf: Tensor | None


@dataclass(eq=False)
class _Compiled:
    """What the engine keeps per bucket besides its buffers."""

    hyper: HyperTensor
    signature: tuple = ()
    fn: Callable[..., None] | None = None
    name: str = ""


@dataclass(eq=False)
class _Group:
    """One param group's layout, its compiled steps and its options as last seen."""

    layout: GroupLayout | None = None
    compiled: list[_Compiled] = field(default_factory=list)
    signature: tuple | None = None
    options: RMSpropOptions | None = None


class StepEngine:
    """The fused step of one optimizer.

    Args:
        backend: ``"auto"``, ``"inductor"``, ``"torchair"`` or ``"eager"``.
        npu_mode: torchair's mode (used where the backend resolves to torchair).
        dump_dir: graph-dump folder, "" for none.
        aliases: other frameworks' param-group keys mapped onto ours.
    """

    def __init__(self, backend: str, npu_mode: str, dump_dir: str, aliases: Mapping[str, str] | None = None) -> None:
        self.backend = backend
        self.npu_mode = npu_mode
        self.dump_dir = dump_dir
        self.aliases = dict(aliases or {})
        self.groups: dict[int, _Group] = {}
        #: Bumped whenever a layout is gathered anew (a compiled train step guards on it).
        self.generation = 0
        self._keys = RMSpropOptions.names() + tuple(self.aliases)

    # -- the public-to-the-package interface --------------------------------------

    def options(self, index: int, group: Mapping[str, Any]) -> RMSpropOptions:
        """The options of param group ``index`` (rebuilt and validated when it changed)."""
        entry = self.groups.get(index) or self.groups.setdefault(index, _Group())
        signature = tuple(map(group.get, self._keys))
        if entry.options is None or signature != entry.signature:
            entry.options = RMSpropOptions.from_group(group, self.aliases)
            entry.signature = signature
        return entry.options

    def layouts(self) -> dict[int, GroupLayout]:
        return {i: g.layout for i, g in self.groups.items() if g.layout is not None}

    def step(
        self,
        param_groups: Sequence[dict],
        state: TrackedState,
        amp: Amp,
        grads: Sequence[list[Tensor | None]] | None = None,
    ) -> None:
        """One step of every param group (the four phases of the module docstring).

        ``grads``: per group, the grads to use instead of each param's ``.grad`` (the
        compiled graph's values, see ``_in_compile.py``)."""
        jobs = []
        for index, group in enumerate(param_groups):
            options = self.options(index, group)
            prepared = self.prepare(index, group, options, state, None if grads is None else grads[index])
            if prepared is not None:
                jobs.append((index, options, *prepared))
        steps = [self._resolve(index, layout, options, amp) for index, options, layout, _, _ in jobs]
        if amp.grad_scale is not None:
            self._unscale([(layout, grads, ptrs) for _, _, layout, grads, ptrs in jobs], amp.grad_scale)
        for (index, options, layout, grads, ptrs), fns in zip(jobs, steps):
            self._run(index, layout, grads, ptrs, options, fns, state, amp)

    def prepare(
        self,
        index: int,
        group: Mapping[str, Any],
        options: RMSpropOptions,
        state: TrackedState,
        grads: list[Tensor | None] | None = None,
    ) -> tuple[GroupLayout, tuple, tuple] | None:
        """Group ``index``'s layout, current, the grads of its params that have one and
        their data pointers (``None`` when no param has a grad)."""
        gparams = group["params"]
        if grads is None:
            grads = list(map(_GRAD, gparams))
        entry = self.groups.get(index) or self.groups.setdefault(index, _Group())
        layout = entry.layout
        roles = options.roles
        if layout is None or not layout.unchanged(state, roles, gparams, grads):
            if all(g is None for g in grads):
                return None
            layout = self._gather(index, entry, gparams, grads, roles, options, state)
        if not layout.params:
            return None
        grads = layout.take_params(grads)
        return layout, grads, grad_pointers(grads, index)

    def zero_grad_into_buffers(self, param_groups: Sequence[dict]) -> list[Tensor]:
        """``zero_grad(set_to_none=False)`` for the params in buckets: point each grad at
        its slot of the flat grad buffer (backward then accumulates straight into it)
        and zero each flat grad buffer at once. Returns the grads left for the caller
        to zero as torch does (loose params, groups not gathered yet, foreign grads, and
        the tensors a re-pointed grad replaced, which torch would have zeroed)."""
        rest: list[Tensor] = []
        for index, group in enumerate(param_groups):
            gparams = group["params"]
            grads = list(map(_GRAD, gparams))
            entry = self.groups.get(index)
            layout = entry.layout if entry is not None else None
            if layout is None or tuple(map(operator.is_, grads, repeat(None))) != layout.no_grad:
                rest += [g for g in grads if g is not None]
                continue
            present = layout.take_params(grads)
            for bucket in layout.buckets:
                bgrads = bucket.take_grads(present)
                if tuple(map(Tensor.data_ptr, bgrads)) != bucket.slot_ptrs:
                    for p, g, slot in zip(bucket.params, bgrads, bucket.slots):
                        if g.data_ptr() == slot.data_ptr():
                            continue
                        rest.append(g)  # zeroed as torch does: a reference the user kept reads 0
                        if not is_foreign(g) and p.data_ptr() == _slot_param_ptr(bucket, slot):
                            p.grad = bucket.slot_view(slot)  # (DDP's bucket views and params that moved stay)
                bucket.grad.zero_()
            rest += layout.take_loose(present)
        return rest

    def step_buffers(self, state: dict) -> list[Tensor]:
        """Every tensor a step writes, in a fixed order: per bucket its flat param
        buffer, its flat state buffers and its step counts; per loose param the param,
        its state tensors and its step."""
        out: list[Tensor] = []
        for _, entry in sorted(self.groups.items()):
            layout = entry.layout
            if layout is None:
                continue
            for b in layout.buckets:
                out += [b.param, *b.state.values(), b.steps]
            for p in layout.loose:
                st = state[p]
                out += [p, *(st[role] for role in layout.roles), st["step"]]
        return out

    def mark_stale(self) -> None:
        for entry in self.groups.values():
            if entry.layout is not None:
                entry.layout.stale = True

    def describe(self) -> list[dict[str, Any]]:
        """One entry per bucket of the last step: group, device, dtype, tensors, elements."""
        out = []
        for index, entry in sorted(self.groups.items()):
            if entry.layout is None:
                continue
            for bucket, compiled in zip(entry.layout.buckets, entry.compiled or [None] * len(entry.layout.buckets)):
                out.append(
                    {
                        "group": index,
                        "device": str(bucket.device),
                        "dtype": str(bucket.param.dtype).removeprefix("torch."),
                        "tensors": len(bucket.params),
                        "elements": bucket.numel,
                        "state": list(bucket.state),
                        "graph": compiled.name if compiled is not None else "",
                    }
                )
        return out

    # -- phases ---------------------------------------------------------------------

    def _gather(self, index, entry, gparams, grads, roles, options, state) -> GroupLayout:
        check_grads([p for p, g in zip(gparams, grads) if g is not None], index)
        layout = GroupLayout.build(
            gparams,
            grads,
            state,
            roles,
            entry.layout,
            initial_square_avg=options.initial_square_avg,
            split_by_step=options.bias_correction,
        )
        entry.layout = layout
        entry.compiled = [_Compiled(HyperTensor(b.device)) for b in layout.buckets]
        self.generation += 1
        return layout

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "torchair" if device.type == "npu" else "inductor"
        return self.backend

    def _resolve(self, index: int, layout: GroupLayout, options: RMSpropOptions, amp: Amp) -> list[Callable]:
        """The compiled step of each bucket, kept on the bucket's entry while its
        signature holds (the common case: every step); a new structure is compiled here,
        on scratch buffers, before anything is changed."""
        entry = self.groups[index]
        flags = options.structure() | ({"found_inf"} if amp.found_inf is not None else set())
        fns = []
        for bucket, compiled in zip(layout.buckets, entry.compiled):
            backend = self._resolve_backend(bucket.device)
            mode = self.npu_mode if backend == "torchair" else ""
            signature = (flags, backend, mode, self.dump_dir)
            if compiled.fn is None or compiled.signature != signature:
                key = StepKey(backend, bucket.device.type, bucket.step_args[0].dtype, frozenset(flags), mode, self.dump_dir)
                with bucket_context(self.describe()) if self.dump_dir else contextlib.nullcontext():
                    fn = get_bucket_step(key, like=bucket.step_args)
                compiled.fn, compiled.signature, compiled.name = fn, signature, key.name()
            fns.append(compiled.fn)
        return fns

    @staticmethod
    def _unscale(jobs: list[tuple[GroupLayout, tuple, tuple]], grad_scale: Tensor) -> None:
        """``GradScaler.unscale_``'s effect, in place: every grad times 1 / scale."""
        inv = grad_scale.double().reciprocal().float()
        per_device: dict[torch.device, Tensor] = {}
        for layout, grads, ptrs in jobs:
            for bucket in layout.buckets:
                bgrads = bucket.take_grads(grads)
                scale = per_device.setdefault(bucket.device, inv.to(bucket.device, non_blocking=True))
                if bucket.take_grads(ptrs) == bucket.slot_ptrs:
                    bucket.grad.mul_(scale)  # they are the flat buffer's slots
                else:
                    torch._foreach_mul_(list(bgrads), scale)
            loose = list(layout.take_loose(grads))
            if loose:
                torch._foreach_mul_(loose, inv.to(loose[0].device, non_blocking=True))

    def _run(self, index, layout, grads, ptrs, options, fns, state, amp: Amp) -> None:
        found_inf = amp.found_inf
        for bucket, compiled, fn in zip(layout.buckets, self.groups[index].compiled, fns):
            bucket.load_grads(bucket.take_grads(grads), bucket.take_grads(ptrs))
            skip = None if found_inf is None else found_inf.to(bucket.device, non_blocking=True)
            hyper = compiled.hyper.refresh(options, bucket.steps[0] + 1 if options.bias_correction else None)
            segments = _segments(bucket) if options.caution else (None, None)
            if self.dump_dir:
                with bucket_context(self.describe()):
                    fn(*bucket.step_args, hyper, skip, *segments)
            else:
                fn(*bucket.step_args, hyper, skip, *segments)
            bucket.steps.add_(1 if skip is None else 1 - skip)
            # The step wrote to the flat buffer, not through `p`: tell autograd, so a graph
            # that saved a param before the step still fails on backward, as with torch.
            torch.autograd.graph.increment_version(bucket.params)
        if layout.loose:  # params that cannot be views of a flat buffer: per-tensor step
            self._step_loose(layout.loose, layout.take_loose(grads), options, state, found_inf)
            torch.autograd.graph.increment_version(layout.loose)

    @staticmethod
    def _step_loose(params: list[Tensor], grads, options: RMSpropOptions, state, found_inf: Tensor | None) -> None:
        """The per-tensor step for params that are not in a flat bucket.

        A param listed twice in a group is updated twice, one update after the other,
        as torch.optim.RMSprop does (it warns about the duplicate at construction): the
        params go in rounds in which each appears at most once."""
        rounds: list[list[int]] = []
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            k = seen[id(p)] = seen.get(id(p), -1) + 1
            if k == len(rounds):
                rounds.append([])
            rounds[k].append(i)
        for indices in rounds:
            ps = [params[i] for i in indices]
            _step_tensors(ps, [grads[i] for i in indices], [state[p] for p in ps], options, found_inf)


def _step_tensors(params, grads, states, options: RMSpropOptions, found_inf: Tensor | None) -> None:
    # DTensors (FSDP2) are updated through their local shards; their state stays DTensor.
    steps = [st["step"] for st in states]

    def role(name: str) -> list[Tensor] | None:
        return local_tensors([st[name] for st in states]) if name in options.roles else None

    skip = None if found_inf is None else found_inf.to(steps[0].device)
    rmsprop_step(
        local_tensors(params),
        local_tensors(grads, like=params),
        role("square_avg"),
        role("grad_avg"),
        role("momentum_buffer"),
        state_steps=[t + 1 for t in steps] if options.bias_correction else None,
        found_inf=found_inf,
        **options.step_kwargs(),
    )
    torch._foreach_add_(steps, 1 if skip is None else 1 - skip)


def _segments(bucket: Bucket) -> tuple[Tensor, Tensor]:
    if bucket.segments is None:
        per = 2 if bucket.param.is_complex() else 1
        bucket.segments = segments_like(bucket.step_args[0], [p.numel() * per for p in bucket.params], True)
    return bucket.segments


def _slot_param_ptr(bucket: Bucket, slot: Tensor) -> int:
    """The address of the param slot that corresponds to a grad slot."""
    return bucket.param.data_ptr() + (slot.data_ptr() - bucket.grad.data_ptr())
