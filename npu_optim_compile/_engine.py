"""The step engine: what ``NpuFusedRMSprop.step()`` runs, apart from the Optimizer facade.

One :class:`StepEngine` per optimizer keeps, per param group, a :class:`~._plan.GroupPlan`
(its buckets and loose params) and, per bucket, the compiled step and its hyperparameter
tensor. Params, grads and state stay the user's tensors, where torch has them (unless
the optimizer combines them, ``_combined.py``). A step goes in four phases, so that a
step that raises changes nothing:

1. **prepare** every group: the cheap per-step check (``GroupPlan.current``) or, when
   something moved, validation and a new plan (which copies nothing);
2. **resolve** the compiled step of every bucket; a structure seen for the first time
   is compiled on scratch buffers first (a compile that fails fails here);
3. **unscale** the grads in place under a GradScaler (what its ``unscale_`` does);
4. **run** every bucket (``_executors.py``), then the per-tensor step for loose params.

Inside a user's ``torch.compile`` the same engine runs behind one custom op
(``_in_compile.py``).
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch
from torch import Tensor

from ._amp import Amp
from ._bucket_step import StepKey, get_bucket_step, get_segment_kernel, is_built
from ._hyper import HyperTensor
from ._combined import Combiner
from ._dump import bucket_context
from ._executors import run_flat, run_segments, run_staged, step_loose
from ._plan import Bucket, GroupPlan
from ._segments import NotElementwise
from ._npu import is_npu_device
from ._state import TrackedState
from ._tensors import GRAD, check_grads, grad_pointers
from .options import RMSpropOptions

__all__ = ["Amp", "GroupWork", "StepEngine"]

log = logging.getLogger("npu_optim_compile")
_MISSING = object()


@dataclass(frozen=True)
class GroupWork:
    """One group's part of one step: its options, its plan, and the grads of its params
    that have one (in the plan's order) with their data pointers."""

    index: int
    options: RMSpropOptions
    plan: GroupPlan
    grads: tuple[Tensor, ...]
    ptrs: tuple[int, ...]


@dataclass(eq=False)
class _Group:
    """One param group's plan and its options as last seen."""

    plan: GroupPlan | None = None
    signature: tuple | None = None
    options: RMSpropOptions | None = None


@dataclass(eq=False)
class _Compiled:
    """What a bucket keeps of its compiled step: for which signature, the callable (a
    compiled bucket step, or a segment driver), its name and its hyper tensor."""

    signature: tuple
    fn: Any
    name: str
    hyper: HyperTensor = field(repr=False)


class StepEngine:
    """The fused step of one optimizer.

    Args:
        backend: ``"auto"``, ``"inductor"``, ``"torchair"`` or ``"eager"``.
        npu_mode: torchair's mode (used where the backend resolves to torchair).
        dump_dir: graph-dump folder, "" for none.
        aliases: other frameworks' param-group keys mapped onto ours.
        required: the keys every param group must have (the optimizer's defaults').
        combine: combine params into flat buffers (``_combined.py``).
    """

    def __init__(
        self,
        backend: str,
        npu_mode: str,
        dump_dir: str,
        aliases: Mapping[str, str] | None = None,
        required: Sequence[str] = (),
        combine: bool = False,
    ) -> None:
        self.backend = backend
        self.npu_mode = npu_mode
        self.dump_dir = dump_dir
        self.aliases = dict(aliases or {})
        self.required = tuple(required)  # group keys every group must have (RMSpropOptions.from_group)
        self.combiner = Combiner() if combine else None
        self.groups: dict[int, _Group] = {}
        #: Bumped whenever a plan is made anew (a compiled train step guards on it).
        self.generation = 0
        self._keys = RMSpropOptions.group_keys() + tuple(self.aliases)

    # -- the public-to-the-package interface --------------------------------------

    def options(self, index: int, group: Mapping[str, Any]) -> RMSpropOptions:
        """The options of param group ``index`` (rebuilt and validated when it changed)."""
        entry = self.groups.get(index) or self.groups.setdefault(index, _Group())
        signature = tuple(map(group.get, self._keys, repeat(_MISSING)))  # a deleted key is seen
        if entry.options is None or signature != entry.signature:
            entry.options = RMSpropOptions.from_group(group, self.aliases, self.required)
            entry.signature = signature
        return entry.options

    def plans(self) -> dict[int, GroupPlan]:
        return {i: g.plan for i, g in self.groups.items() if g.plan is not None}

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
        work = []
        for index, group in enumerate(param_groups):
            options = self.options(index, group)
            item = self.prepare(index, group, options, state, None if grads is None else grads[index])
            if item is not None:
                work.append(item)
        for item in work:
            self._resolve(item, amp)
        if amp.grad_scale is not None:
            self._unscale(work, amp.grad_scale)
        for item in work:
            self._run(item, state, amp)

    def prepare(
        self,
        index: int,
        group: Mapping[str, Any],
        options: RMSpropOptions,
        state: TrackedState,
        grads: list[Tensor | None] | None = None,
    ) -> GroupWork | None:
        """Group ``index``'s plan, current, and the grads of its params that have one
        (``None`` when no param has a grad)."""
        gparams = group["params"]
        if grads is None:
            grads = list(map(GRAD, gparams))
        entry = self.groups.get(index) or self.groups.setdefault(index, _Group())
        plan = entry.plan
        roles = options.roles
        signature = self._plan_signature(options)
        if plan is None or not _current(plan, state, roles, signature, gparams, grads):
            if all(g is None for g in grads):
                return None
            check_grads([p for p, g in zip(gparams, grads) if g is not None], index)
            plan = entry.plan = GroupPlan.build(
                gparams,
                grads,
                state,
                roles,
                lambda device: self._kind(device, options),
                signature,
                initial_square_avg=options.initial_square_avg,
                split_by_step=options.bias_correction,
                combiner=self.combiner,
            )
            self.generation += 1
        if not plan.params:
            return None
        present = plan.take_params(grads)
        return GroupWork(index, options, plan, present, grad_pointers(present))  # (torch's error for a sparse grad)

    def mark_stale(self) -> None:
        for entry in self.groups.values():
            if entry.plan is not None:
                entry.plan.stale = True

    def step_buffers(self) -> list[Tensor]:
        """Every param tensor a step writes, in a fixed order (a combined chunk on an
        accelerator: its flat buffer)."""
        out: list[Tensor] = []
        for _, entry in sorted(self.groups.items()):
            plan = entry.plan
            if plan is None:
                continue
            for b in plan.buckets:
                out += [b.chunk.param] if b.kind == "flat" else b.params
            out += plan.loose
        return out

    def describe(self) -> list[dict[str, Any]]:
        """One entry per bucket of the last step: group, device, dtype, tensors, elements."""
        out = []
        for index, entry in sorted(self.groups.items()):
            if entry.plan is None:
                continue
            for bucket in entry.plan.buckets:
                compiled = bucket.cache.get("compiled")
                out.append(
                    {
                        "group": index,
                        "device": str(bucket.device),
                        "dtype": str(bucket.dtype).removeprefix("torch."),
                        "tensors": len(bucket.params),
                        "elements": bucket.numel,
                        "state": list(entry.plan.roles),
                        "kind": bucket.kind,
                        "graph": compiled.name if compiled is not None else "",
                    }
                )
        return out

    # -- phases ---------------------------------------------------------------------

    def _resolve_backend(self, device: torch.device) -> str:
        if self.backend == "auto":
            return "torchair" if is_npu_device(device) else "inductor"
        return self.backend

    def _kind(self, device: torch.device, options: RMSpropOptions) -> str:
        """How buckets on ``device`` run (``_plan.Bucket.kind``); the eager backend runs
        the Python bucket step on staging copies."""
        backend = self._resolve_backend(device)
        if backend == "inductor" and device.type == "cpu" and not options.caution:
            return "segments"  # caution's per-param mean is not elementwise
        return "staged"

    def _plan_signature(self, options: RMSpropOptions) -> tuple:
        """What a plan depends on besides the tensors: the bucket kinds (through the
        backend and caution) and whether buckets share step counts."""
        return (self.backend, bool(options.caution), bool(options.bias_correction))

    def _resolve(self, work: GroupWork, amp: Amp) -> None:
        """The compiled step of each bucket, kept on the bucket while its signature holds
        (the common case: every step); a new structure is compiled here, on scratch
        buffers, before anything is changed."""
        flags = work.options.structure() | ({"found_inf"} if amp.found_inf is not None else set())
        for bucket in work.plan.buckets:
            if bucket.kind == "loose":  # its compile failed: the per-tensor step, for this plan
                continue
            backend = self._resolve_backend(bucket.device)
            mode = self.npu_mode if backend == "torchair" else ""
            signature = (flags, backend, mode, self.dump_dir, bucket.kind)
            compiled = bucket.cache.get("compiled")
            if compiled is not None and compiled.signature == signature:
                continue
            executor = "segments" if bucket.kind == "segments" else "flat"
            key = StepKey(backend, bucket.device.type, bucket.dtype, frozenset(flags), mode, self.dump_dir, executor)
            fresh = backend != "eager" and not is_built(key)
            if fresh:
                log.info("npu_optim_compile: compiling %s (%s); cached for every later step", key.name(), backend)
            start = time.perf_counter()
            with bucket_context(self.describe()) if self.dump_dir else contextlib.nullcontext():
                try:
                    fn = get_segment_kernel(key) if executor == "segments" else get_bucket_step(key, bucket.numel)
                except NotElementwise as e:
                    log.warning("npu_optim_compile: %s: %s; this bucket takes the per-tensor step", key.name(), e)
                    bucket.kind = "loose"
                    fn = None
                except Exception as e:
                    if not _toolchain_error(e):
                        raise
                    if not torch._dynamo.config.suppress_errors:
                        raise RuntimeError(_NO_COMPILER.format(backend=backend, error=_toolchain_error(e))) from e
                    warnings.warn(
                        f"npu_optim_compile: no working C++ compiler ({_toolchain_error(e)}); "
                        "torch._dynamo.config.suppress_errors is set, so this step runs eagerly, per tensor",
                        stacklevel=4,
                    )
                    bucket.kind = "loose"
                    fn = None
            if fresh:
                log.info("npu_optim_compile: %s ready in %.1f s", key.name(), time.perf_counter() - start)
            hyper = compiled.hyper if compiled is not None else HyperTensor(bucket.device)
            bucket.cache["compiled"] = _Compiled(signature, fn, key.name(), hyper)

    @staticmethod
    def _unscale(work: list[GroupWork], grad_scale: Tensor) -> None:
        """``GradScaler.unscale_``'s effect, in place: every grad times 1 / scale."""
        inv = grad_scale.double().reciprocal().float()
        per_device: dict[torch.device, list[Tensor]] = {}
        for item in work:
            for g in item.grads:
                per_device.setdefault(g.device, []).append(g)
        for device, grads in per_device.items():
            torch._foreach_mul_(grads, inv.to(device, non_blocking=True))

    def _run(self, work: GroupWork, state: dict, amp: Amp) -> None:
        options, plan = work.options, work.plan
        found_inf = amp.found_inf
        late: list[Bucket] = []
        for bucket in plan.buckets:
            if bucket.kind == "loose":
                late.append(bucket)
                continue
            compiled = bucket.cache["compiled"]
            grads = bucket.take(work.grads)
            skip = None if found_inf is None else found_inf.to(bucket.device, non_blocking=True)
            step = None
            if options.bias_correction and bucket.kind != "segments":  # one count per bucket
                step = (bucket.chunk.steps[0] if bucket.kind == "flat" else bucket.states[0]["step"]) + 1
            hyper = compiled.hyper.refresh(options, step)
            with bucket_context(self.describe()) if self.dump_dir else contextlib.nullcontext():
                if bucket.kind == "segments":
                    run_segments(bucket, compiled.fn, bucket.take(work.ptrs), hyper, skip, options.roles)
                elif bucket.kind == "flat":
                    run_flat(bucket, compiled.fn, grads, hyper, skip, options)
                else:
                    run_staged(bucket, compiled.fn, grads, hyper, skip, options)
        loose = list(plan.loose)
        loose_grads = list(plan.take_loose(work.grads))
        for bucket in late:
            loose += bucket.params
            loose_grads += bucket.take(work.grads)
        if loose:
            step_loose(loose, loose_grads, options, state, found_inf)


_NO_COMPILER = (
    "NpuFusedRMSprop could not compile its step with backend={backend!r}: {error}. inductor "
    "builds the step's kernel with a C++ compiler: install one (e.g. `apt-get install g++`, "
    "or set CXX to a working one), or construct the optimizer with backend='eager' (no "
    "compilation), or set torch._dynamo.config.suppress_errors = True to fall back to the "
    "per-tensor eager step automatically"
)


def _toolchain_error(e: BaseException) -> str:
    """The message of a missing or broken C++ toolchain in ``e``'s chain, else ""."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ in ("InvalidCxxCompiler", "CppCompileError"):
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        e = e.__cause__ or getattr(e, "inner_exception", None) or e.__context__
    return ""


def _current(plan: GroupPlan, state, roles, signature, gparams, grads) -> bool:
    try:
        return plan.current(state, roles, signature, gparams, grads)
    except RuntimeError:  # e.g. a sparse grad where a dense one was: plan (and fail) anew
        return False
