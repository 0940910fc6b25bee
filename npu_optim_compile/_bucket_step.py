"""Compiled bucket steps, cached by structure only, and the hyperparameter layout they read.

A bucket step updates one flat buffer per role (see ``_buckets.py``) by calling
:func:`~npu_optim_compile.rmsprop_step` on one-element lists. Its hyperparameters come
in one 1-D tensor laid out as :data:`HYPER_LAYOUT`, so the compiled graph depends only
on a :class:`StepKey`: backend, device type, dtype and the on/off options
(:meth:`RMSpropOptions.structure`). Changing a value never recompiles, and every
optimizer in the process with the same structure shares one compiled graph (shapes are
dynamic, so bucket sizes do not matter).

Note [hyperparameters in one 1-D tensor]: not five 0-d tensors. Fake-tensor conversion
gives every 0-d CPU float64 input an ``item()`` symbol; tensorification then restarts
the trace, so a cold compile traced twice (torch 2.13). Elements selected inside the
graph are 0-d, so they still do not promote the dtype of the buffers they scale.

Note [one code object per key]: Dynamo keeps its cache on the function's code object
and silently falls back to eager after ``recompile_limit`` (8) entries on one code
object. Each key therefore gets its own code object (``code.replace(co_name=...)``), so
keys never compete for those entries.
"""

from __future__ import annotations

import copy
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._dump import GraphDump
from .functional import rmsprop_step
from .options import RMSpropOptions

__all__ = [
    "BACKENDS",
    "FLAGS",
    "HYPER_LAYOUT",
    "HyperTensor",
    "StepKey",
    "clear_cache",
    "compile_counts",
    "get_bucket_step",
    "hyper_dtype",
    "segments_like",
]

#: The backends ``NpuFusedRMSprop(backend=...)`` accepts (``"auto"`` is resolved per
#: device before a key is built).
BACKENDS = ("auto", "inductor", "torchair", "eager")

#: The values a bucket step reads at run time, in the order of its hyper tensor: the
#: options of kind VALUE, then the bucket's step count (for bias correction).
HYPER_LAYOUT = ("lr", "alpha", "eps", "weight_decay", "momentum", "loss_scale", "max_lr", "step")

#: The on/off flags a compiled step can specialise on: ``RMSpropOptions.structure()``'s,
#: plus ``found_inf`` (an AMP skip flag is passed).
FLAGS = RMSpropOptions.structure_flags() | {"found_inf"}


def hyper_dtype(device: torch.device) -> torch.dtype:
    """float64 reproduces torch's Python-float arithmetic (``1 - alpha``, ``-lr``)
    exactly; the Ascend graph engines handle float32 scalars best."""
    return torch.float32 if device.type == "npu" else torch.float64


class HyperTensor:
    """One bucket's :data:`HYPER_LAYOUT` values in one 1-D tensor on its device,
    refreshed before each step (a copy only when a value changed; tensor values, which
    may change in place, are copied every time, on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(len(HYPER_LAYOUT), dtype=hyper_dtype(device), device=device)
        self._seen: tuple | None = None

    def refresh(self, options: RMSpropOptions, step: Tensor | None = None) -> Tensor:
        values = tuple(getattr(options, name) for name in HYPER_LAYOUT[:-1])
        numbers = tuple(None if isinstance(v, Tensor) else v for v in values)
        if numbers != self._seen:  # (an unset value, max_lr without corrected decay, reads 0)
            staged = torch.tensor([0.0 if v is None else v for v in numbers] + [0.0], dtype=self.tensor.dtype)
            if self.tensor.device.type != "cpu":  # no host synchronisation
                staged = staged.pin_memory()
            self.tensor.copy_(staged, non_blocking=True)
            self._seen = numbers
        for i, v in enumerate(values):
            if isinstance(v, Tensor):
                self.tensor[i].copy_(v.detach().reshape(()), non_blocking=True)
        if step is not None:
            self.tensor[-1].copy_(step, non_blocking=True)
        return self.tensor


@dataclass(frozen=True)
class StepKey:
    """Everything a compiled bucket step depends on. Values never enter it."""

    backend: str  # "inductor", "torchair" or "eager" (resolved, never "auto")
    device_type: str
    dtype: torch.dtype
    flags: frozenset[str] = frozenset()
    mode: str = ""  # torchair's CompilerConfig.mode ("" for other backends)
    dump_dir: str = ""  # graph dumps (see _dump.py); "" when off

    def __post_init__(self) -> None:
        unknown = self.flags - FLAGS
        if unknown:
            raise ValueError(f"unknown step flags {sorted(unknown)}; known: {sorted(FLAGS)}")

    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return "_".join(["rmsprop_bucket_step", self.device_type, dtype, *sorted(self.flags)])


BucketStep = Callable[..., None]

_lock = threading.Lock()
_cache: dict[StepKey, BucketStep] = {}
_compile_counts: Counter[StepKey] = Counter()


def compile_counts() -> Counter[StepKey]:
    """How many graphs the backend compiled, per key, since the last :func:`clear_cache`."""
    return Counter(_compile_counts)


def clear_cache() -> None:
    """Forget every compiled bucket step (the next step compiles again)."""
    with _lock:
        _cache.clear()
        _compile_counts.clear()


def _make_python_step(key: StepKey) -> BucketStep:
    """The bucket step for ``key`` as a fresh function (own code object, see the note)."""
    static = RMSpropOptions.static_step_kwargs(key.flags)
    centered, momentum, weight_decay, loss_scale_on, amp_skip, caution, corrected = map(
        key.flags.__contains__,
        ("centered", "momentum", "weight_decay", "loss_scale", "found_inf", "caution", "corrected_weight_decay"),
    )

    def step(param, grad, square_avg, grad_avg, momentum_buffer, hyper, found_inf, segment_ids, segment_sizes):
        h = dict(zip(HYPER_LAYOUT, hyper.unbind()))
        rmsprop_step(
            [param],
            [grad],
            [square_avg],
            [grad_avg] if centered else None,
            [momentum_buffer] if momentum else None,
            lr=h["lr"],
            alpha=h["alpha"],
            eps=h["eps"],
            weight_decay=h["weight_decay"] if weight_decay else 0.0,
            momentum=h["momentum"],
            loss_scale=h["loss_scale"] if loss_scale_on else 1.0,
            state_steps=[h["step"]],
            found_inf=found_inf if amp_skip else None,
            max_lr=h["max_lr"] if corrected else None,
            segment_ids=[segment_ids] if caution else None,
            segment_sizes=[segment_sizes] if caution else None,
            **static,
        )

    code = step.__code__.replace(co_name=key.name(), co_qualname=key.name())
    return types.FunctionType(code, step.__globals__, key.name(), None, step.__closure__)


def _counting(key: StepKey, compiler: Callable) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs):
        _compile_counts[key] += 1
        return compiler(gm, example_inputs)

    return backend


def _inductor_compiler(key: StepKey) -> Callable:
    """inductor with our foreach-fusion pass as ``post_grad_custom_pre_pass``, set per
    compile (never in the process-wide config); the pass has a ``uuid()``, so inductor's
    FX graph cache stays on and correct."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from .passes import ForeachFusionPass, fuse_foreach_ops

    def compile_step(gm: torch.fx.GraphModule, example_inputs):
        fusion = ForeachFusionPass()
        patches = {"post_grad_custom_pre_pass": fusion}
        if not key.dump_dir:
            return compile_fx(gm, example_inputs, config_patches=patches)
        dump = GraphDump(key.dump_dir, key.name())
        dump.dynamo_graph(gm)

        def inner(aten_gm, inputs, **kwargs):
            dump.aten_graphs(aten_gm, lambda graph: fuse_foreach_ops(graph, options=fusion.options))
            compiled = compile_fx_inner(aten_gm, inputs, **kwargs)
            dump.inductor_code(getattr(compiled, "source_code", None))
            return compiled

        start = time.perf_counter()
        # An AOTAutograd-cache hit would skip the aten graph (and `inner`) altogether;
        # inductor's FX graph cache stays on: `inner` writes every file on its hits too.
        with torch._functorch.config.patch(enable_autograd_cache=False):
            compiled = compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)
        dump.finish(backend="inductor", key=key, compile_seconds=round(time.perf_counter() - start, 3))
        return compiled

    return compile_step


def _torchair_compiler(key: StepKey) -> Callable:
    """torchair with our pass, on a CompilerConfig of our own (``_torchair_backend.py``)."""
    from ._torchair_backend import make_torchair_backend  # lazy: never at package import
    from .passes import torchair_foreach_fusion

    def compile_step(gm: torch.fx.GraphModule, example_inputs):
        if not key.dump_dir:
            backend = make_torchair_backend(mode=key.mode, post_grad_pass=torchair_foreach_fusion)
            return backend(gm, example_inputs)
        dump = GraphDump(key.dump_dir, key.name())
        dump.dynamo_graph(gm)

        def dumping_pass(aten_gm, inputs, config):
            dump.aten_graphs(copy.deepcopy(aten_gm), lambda graph: None)
            stats = torchair_foreach_fusion(aten_gm, inputs, config)
            dump.write("aten_after_fusion.py", aten_gm.print_readable(print_output=False))
            dump.summary.update(foreach_ops_rewritten=stats.foreach_rewritten, ops_after_fusion=stats.ops_after)

        backend = make_torchair_backend(mode=key.mode, post_grad_pass=dumping_pass, dump_dir=dump.path)
        start = time.perf_counter()
        compiled = backend(gm, example_inputs)
        dump.finish(backend=f"torchair ({key.mode})", key=key, compile_seconds=round(time.perf_counter() - start, 3))
        return compiled

    return compile_step


def _build(key: StepKey) -> BucketStep:
    fn = _make_python_step(key)
    if key.backend == "eager":
        return fn
    if key.backend == "inductor":
        compiler = _inductor_compiler(key)
    elif key.backend == "torchair":
        compiler = _torchair_compiler(key)
    else:  # StepKey is built from a resolved backend; "auto" never gets here
        raise ValueError(f"Invalid backend: {key.backend!r}. Choose one of 'inductor', 'torchair', 'eager'")
    # Callers mark dim 0 of the buffers dynamic (``Bucket.step_args``), so every bucket
    # size shares one graph.
    return torch.compile(fn, backend=_counting(key, compiler), fullgraph=True)


def get_bucket_step(key: StepKey, like: Sequence[Tensor | None] | None = None) -> BucketStep:
    """The (compiled) bucket step for ``key``, built on first use and then shared.

    With ``like`` (a bucket's step arguments), a step built now is also compiled now,
    by one call on small scratch buffers shaped like them (dim 0 dynamic, as the real
    ones): a compile that fails then fails before any real buffer is touched, and the
    real call reuses the graph.
    """
    fn = _cache.get(key)
    if fn is None:
        with _lock:
            fn = _cache.get(key)
            if fn is None:
                fn = _build(key)
                if like is not None:
                    _run_on_scratch(fn, key, like)
                _cache[key] = fn
    return fn


#: Most elements of a scratch buffer. The compile reads its size as the hint for
#: choices such as splitting the kernel over threads (inductor's CPU code runs a
#: buffer of 8 elements on one thread, and then every bucket would), so the scratch is
#: as large as the bucket up to this many elements (4 MiB of float32 per role).
SCRATCH_ELEMENTS = 1 << 20


def _run_on_scratch(fn: BucketStep, key: StepKey, like: Sequence[Tensor | None]) -> None:
    def scratch(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        rows = max(16, min(t.shape[0], SCRATCH_ELEMENTS))
        s = torch.ones((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        torch._dynamo.maybe_mark_dynamic(s, 0)
        return s

    buffers = list(map(scratch, like))
    device = buffers[0].device
    skip = torch.zeros((), dtype=torch.float32, device=device) if "found_inf" in key.flags else None
    n = buffers[0].numel()  # two segments: a count of 1 would be specialised
    segments = segments_like(buffers[0], [n // 2, n - n // 2], "caution" in key.flags)
    fn(*buffers, HyperTensor(device).tensor, skip, *segments)


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
