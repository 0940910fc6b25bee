"""The backends that compile a bucket step: inductor (CPU/CUDA) and torchair (Ascend),
each with our foreach-fusion pass and the graph-dump wiring (``_dump.py``).

A compiler is ``torch.compile``'s ``backend=`` callable for one :class:`StepKey`; every
compile is counted per key (``_bucket_step.compile_counts``).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ._dump import GraphDump

if TYPE_CHECKING:
    from ._bucket_step import StepKey

__all__ = ["counting", "inductor_compiler", "torchair_compiler"]


def counting(key: StepKey, compiler: Callable, counts: Counter) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs):
        counts[key] += 1
        return compiler(gm, example_inputs)

    return backend


def inductor_compiler(key: StepKey, sink: dict | None = None) -> Callable:
    """inductor with our foreach-fusion pass as ``post_grad_custom_pre_pass``, set per
    compile (never in the process-wide config); the pass has a ``uuid()``, so inductor's
    FX graph cache stays on and correct. With ``sink``, the output code of each graph
    is appended to ``sink["sources"]`` and the graph's dump (if any) put in
    ``sink["dump"]`` (a ``"segments"`` key compiles a capturable kernel, see
    ``_segments.capture_patches``)."""
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    from ._segments import capture_patches
    from .passes import ForeachFusionPass, fuse_foreach_ops

    def compile_step(gm: torch.fx.GraphModule, example_inputs):
        fusion = ForeachFusionPass()
        patches = {"post_grad_custom_pre_pass": fusion}
        if not key.dump_dir and sink is None:
            return compile_fx(gm, example_inputs, config_patches=patches)
        dump = GraphDump(key.dump_dir, key.name()) if key.dump_dir else None
        if dump is not None:
            dump.dynamo_graph(gm)
        if sink is not None:
            sink["dump"] = dump

        def inner(aten_gm, inputs, **kwargs):
            if dump is not None:
                dump.aten_graphs(aten_gm, lambda graph: fuse_foreach_ops(graph, options=fusion.options))
            compiled = compile_fx_inner(aten_gm, inputs, **kwargs)
            source = getattr(compiled, "source_code", None)
            if dump is not None:
                dump.inductor_code(source)
            if sink is not None:
                sink.setdefault("sources", []).append(source or "")
            return compiled

        start = time.perf_counter()
        # An AOTAutograd-cache hit would skip the aten graph (and `inner`) altogether;
        # inductor's FX graph cache stays on: `inner` sees the output code on its hits too.
        capture = capture_patches() if key.executor == "segments" else contextlib.nullcontext()
        with torch._functorch.config.patch(enable_autograd_cache=False), capture:
            compiled = compile_fx(gm, example_inputs, inner_compile=inner, config_patches=patches)
        if dump is not None:
            dump.finish(backend="inductor", key=key, compile_seconds=round(time.perf_counter() - start, 3))
        return compiled

    return compile_step


def torchair_compiler(key: StepKey) -> Callable:
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
