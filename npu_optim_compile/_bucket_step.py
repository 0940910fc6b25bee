"""Compiled bucket steps, cached by structure only.

A bucket step updates one flat buffer per role by calling
:func:`~npu_optim_compile.rmsprop_step` on one-element lists. It runs on flat buffers as
they are (a combined chunk, staging copies, ``_executors.py``), or, compiled for
``executor="segments"``, its kernel runs over tensors where they live
(``_segments.py``). Its hyperparameters come in one 1-D tensor laid out as
``_hyper.HYPER_LAYOUT``, so the compiled graph depends only on a :class:`StepKey`:
backend, device type, dtype and the on/off options (:meth:`RMSpropOptions.structure`). Changing a value never recompiles, and every
optimizer in the process with the same structure shares one compiled graph (shapes are
dynamic, so bucket sizes do not matter).

Note [one code object per key]: Dynamo keeps its cache on the function's code object
and silently falls back to eager after ``recompile_limit`` (8) entries on one code
object. Each key therefore gets its own code object (``code.replace(co_name=...)``), so
keys never compete for those entries.
"""

from __future__ import annotations

import threading
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._compilers import counting, inductor_compiler, torchair_compiler
from ._hyper import HYPER_LAYOUT, HyperTensor
from .functional import rmsprop_step
from .options import STATE_ROLES, RMSpropOptions

__all__ = [
    "BACKENDS",
    "FLAGS",
    "StepKey",
    "clear_cache",
    "compile_counts",
    "get_bucket_step",
    "get_segment_kernel",
    "is_built",
    "segments_like",
]

#: The backends ``NpuFusedRMSprop(backend=...)`` accepts (``"auto"`` is resolved per
#: device before a key is built).
BACKENDS = ("auto", "inductor", "torchair", "eager")

#: The on/off flags a compiled step can specialise on: ``RMSpropOptions.structure()``'s,
#: plus ``found_inf`` (an AMP skip flag is passed).
FLAGS = RMSpropOptions.structure_flags() | {"found_inf"}


@dataclass(frozen=True)
class StepKey:
    """Everything a compiled bucket step depends on. Values never enter it."""

    backend: str  # "inductor", "torchair" or "eager" (resolved, never "auto")
    device_type: str
    dtype: torch.dtype
    flags: frozenset[str] = frozenset()
    mode: str = ""  # torchair's CompilerConfig.mode ("" for other backends)
    dump_dir: str = ""  # graph dumps (see _dump.py); "" when off
    #: "flat": the compiled step runs on flat buffers; "segments": its kernel runs over
    #: tensors where they live (``_segments.py``; CPU, inductor).
    executor: str = "flat"

    def __post_init__(self) -> None:
        unknown = self.flags - FLAGS
        if unknown:
            raise ValueError(f"unknown step flags {sorted(unknown)}; known: {sorted(FLAGS)}")

    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        kind = ["segments"] if self.executor == "segments" else []
        return "_".join(["rmsprop_bucket_step", self.device_type, dtype, *kind, *sorted(self.flags)])

    @property
    def roles(self) -> tuple[str, ...]:
        """The state buffers the step reads, in ``STATE_ROLES`` order."""
        return ("square_avg",) + (("grad_avg",) if "centered" in self.flags else ()) + (
            ("momentum_buffer",) if "momentum" in self.flags else ()
        )


BucketStep = Callable[..., None]

_lock = threading.Lock()
_cache: dict[StepKey, BucketStep] = {}
_segment_cache: dict[StepKey, object] = {}  # a SegmentKernel, or the NotElementwise it raised
_compile_counts: Counter[StepKey] = Counter()


def compile_counts() -> Counter[StepKey]:
    """How many graphs the backend compiled, per key, since the last :func:`clear_cache`."""
    return Counter(_compile_counts)


def clear_cache() -> None:
    """Forget every compiled bucket step, here and the segment drivers kept on disk for
    other processes (the next step compiles again)."""
    from . import _driver_cache

    with _lock:
        _cache.clear()
        _segment_cache.clear()
        _compile_counts.clear()
        _driver_cache.clear()


def _make_python_step(key: StepKey) -> BucketStep:
    """The bucket step for ``key`` as a fresh function (own code object, see the note).

    Every option reaches ``rmsprop_step`` from the registry: the STRUCTURE ones from the
    key's flags (``static_step_kwargs``), the VALUE ones from the hyper tensor, except
    those the structure fixes at their neutral value (``fixed_values``: a weight decay
    that is off is the number 0, so its ops are not traced)."""
    static = RMSpropOptions.static_step_kwargs(key.flags)
    fixed = RMSpropOptions.fixed_values(key.flags)
    centered, momentum, amp_skip, caution = map(key.flags.__contains__, ("centered", "momentum", "found_inf", "caution"))

    def step(param, grad, square_avg, grad_avg, momentum_buffer, hyper, found_inf, segment_ids, segment_sizes):
        h = dict(zip(HYPER_LAYOUT, hyper.unbind()))
        values = {name: h[name] for name in HYPER_LAYOUT[:-1]}
        values.update(fixed)
        rmsprop_step(
            [param],
            [grad],
            [square_avg],
            [grad_avg] if centered else None,
            [momentum_buffer] if momentum else None,
            state_steps=[h["step"]],
            found_inf=found_inf if amp_skip else None,
            segment_ids=[segment_ids] if caution else None,
            segment_sizes=[segment_sizes] if caution else None,
            **values,
            **static,
        )

    code = step.__code__.replace(co_name=key.name(), co_qualname=key.name())
    return types.FunctionType(code, step.__globals__, key.name(), None, step.__closure__)


def _build(key: StepKey, sink: dict | None = None) -> BucketStep:
    fn = _make_python_step(key)
    if key.backend == "eager":
        return fn
    if key.backend == "inductor":
        compiler = inductor_compiler(key, sink)
    elif key.backend == "torchair":
        compiler = torchair_compiler(key)
    else:  # StepKey is built from a resolved backend; "auto" never gets here
        raise ValueError(f"Invalid backend: {key.backend!r}. Choose one of 'inductor', 'torchair', 'eager'")
    # Callers mark dim 0 of the buffers dynamic, so every bucket size shares one graph.
    return torch.compile(fn, backend=counting(key, compiler, _compile_counts), fullgraph=True)


def is_built(key: StepKey) -> bool:
    """Whether ``key``'s step (or segment driver) was built in this process already."""
    return key in (_segment_cache if key.executor == "segments" else _cache)


def get_bucket_step(key: StepKey, numel: int | None = None) -> BucketStep:
    """The (compiled) bucket step for ``key``, built on first use and then shared.

    With ``numel`` (a bucket's size), a step built now is also compiled now, by one call
    on scratch buffers of about that size (dim 0 dynamic, as the real ones): a compile
    that fails then fails before any real buffer is touched, and the real call reuses
    the graph.
    """
    fn = _cache.get(key)
    if fn is None:
        with _lock:
            fn = _cache.get(key)
            if fn is None:
                fn = _build(key)
                if numel is not None:
                    rows = max(16, min(numel, SCRATCH_ELEMENTS))
                    fn(*_scratch_args(key, rows))
                _cache[key] = fn
    return fn


def get_segment_kernel(key: StepKey):
    """The segment driver (``_segments.SegmentKernel``) of ``key``'s compiled step, built
    on first use and then shared; raises ``_segments.NotElementwise`` (every time) for a
    structure whose compiled step is not one elementwise kernel."""
    from ._segments import SEGMENT_ROLES, NotElementwise, SegmentKernel, capture_call, driver_source

    from . import _driver_cache

    found = _segment_cache.get(key)
    if found is None:
        with _lock:
            found = _segment_cache.get(key)
            stored = _driver_cache.load(key) if found is None and not key.dump_dir else None
            if stored is not None:  # compiled by an earlier process (_driver_cache.py)
                found = _segment_cache[key] = SegmentKernel(stored, key.roles)
            if found is None:
                sink: dict = {"sources": []}
                fn = _build(key, sink)
                args = _scratch_args(key, 4096)
                probe = dict(zip(("param", "grad", *SEGMENT_ROLES[2:], "hyper", "found_inf"), args))
                try:
                    kernel, arguments = capture_call(fn, args, sink["sources"], probe, 4096)
                    row_bytes = {name: t.stride(0) * t.element_size() for name, t in zip(SEGMENT_ROLES, args) if t is not None}
                    step_slot = HYPER_LAYOUT.index("step") if "bias_correction" in key.flags else -1
                    source = driver_source(kernel.source, arguments, row_bytes, len(HYPER_LAYOUT), step_slot)
                    found = SegmentKernel(source, key.roles)
                    _driver_cache.store(key, source)
                    if sink.get("dump") is not None:
                        sink["dump"].write("segment_driver.cpp", source)
                        sink["dump"].finish(segment_driver="segment_driver.cpp")
                except NotElementwise as e:
                    found = e
                _segment_cache[key] = found
    if isinstance(found, Exception):
        raise found
    return found


#: Most elements of a scratch buffer. The compile reads its size as the hint for
#: choices such as splitting the kernel over threads (inductor's CPU code runs a
#: buffer of 8 elements on one thread, and then every bucket would), so the scratch is
#: as large as the bucket up to this many elements (4 MiB of float32 per role).
SCRATCH_ELEMENTS = 1 << 20


def _scratch_args(key: StepKey, rows: int) -> list[Tensor | None]:
    """Arguments for one call of ``key``'s bucket step on scratch buffers of ``rows``
    elements each (each its own allocation), dim 0 dynamic as the real ones."""
    device = torch.device(key.device_type)

    def buffer() -> Tensor:
        t = torch.ones(rows, dtype=key.dtype, device=device)
        t = torch.view_as_real(t) if t.is_complex() else t
        torch._dynamo.maybe_mark_dynamic(t, 0)
        return t

    roles = key.roles
    states = [buffer() if role in roles else None for role in STATE_ROLES]
    skip = torch.zeros((), dtype=torch.float32, device=device) if "found_inf" in key.flags else None
    param = buffer()
    n = param.numel()  # two segments: a count of 1 would be specialised
    segments = segments_like(param, [n // 2, n - n // 2], "caution" in key.flags)
    return [param, buffer(), *states, HyperTensor(device).tensor, skip, *segments]


def segments_like(flat: Tensor, sizes: Sequence[int], on: bool) -> tuple[Tensor | None, Tensor | None]:
    """``rmsprop_step``'s ``segment_ids`` / ``segment_sizes`` for a flat buffer (its real
    view) holding params of ``sizes`` real elements back to back; ``(None, None)`` when
    ``on`` is false (caution off).

    ``segment_sizes`` gets one unused trailing segment of size 1: inductor (torch 2.13,
    CPU) fails to generate the scatter-add of the per-segment sums into a buffer of
    size 1, which a bucket of one param would need."""
    if not on:
        return None, None
    counts = torch.tensor(list(sizes) + [1], dtype=torch.int64, device=flat.device)
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=flat.device), counts[:-1])
    torch._dynamo.maybe_mark_dynamic(ids, 0)
    torch._dynamo.maybe_mark_dynamic(counts, 0)
    return ids, counts.to(torch.float32)
