"""Compiled bucket steps, cached by structure only.

A bucket step updates one flat buffer per role (see ``_buckets.py``) by calling
:func:`~npu_optim_compile.rmsprop_step` on one-element lists. Its hyperparameters come
in one tensor, ``[lr, alpha, eps, weight_decay, momentum, loss_scale, step]``, so the compiled graph
depends only on a :class:`StepKey`: backend, device type, dtype and the on/off options. Changing lr, alpha, eps, weight_decay, momentum or
the step count never recompiles, and every optimizer in the process with the same
structure shares one compiled graph (shapes are dynamic, so bucket sizes do not matter).

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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._dump import GraphDump
from .functional import rmsprop_step

__all__ = ["BACKENDS", "FLAGS", "StepKey", "get_bucket_step", "compile_counts", "clear_cache"]

#: The backends ``NpuFusedRMSprop(backend=...)`` accepts.
BACKENDS = ("auto", "inductor", "torchair", "eager")


#: The on/off options a compiled step can specialise on (``rmsprop_step`` keywords, plus
#: ``momentum``: momentum buffers in use, ``weight_decay`` / ``loss_scale``: the value is
#: not the neutral 0 / 1, ``grad_scale`` / ``found_inf``: AMP tensors are passed).
FLAGS = frozenset(
    {
        "centered", "maximize", "momentum", "weight_decay", "eps_in_sqrt", "lr_in_momentum",
        "decoupled_weight_decay", "lr_unscaled_decay", "nesterov", "bias_correction",
        "loss_scale", "grad_scale", "found_inf",
    }
)


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
    on = key.flags.__contains__
    options = dict(
        centered=on("centered"),
        maximize=on("maximize"),
        eps_in_sqrt=on("eps_in_sqrt"),
        lr_in_momentum=on("lr_in_momentum"),
        decoupled_weight_decay=on("decoupled_weight_decay"),
        lr_scaled_decay=not on("lr_unscaled_decay"),
        nesterov=on("nesterov"),
        bias_correction=on("bias_correction"),
    )
    centered, momentum, weight_decay, loss_scale_on, amp_scale, amp_skip = map(
        on, ("centered", "momentum", "weight_decay", "loss_scale", "grad_scale", "found_inf")
    )

    def step(param, grad, square_avg, grad_avg, momentum_buffer, hyper, grad_scale, found_inf):
        lr, alpha, eps, wd, mom, loss_scale, t = hyper.unbind()
        rmsprop_step(
            [param],
            [grad],
            [square_avg],
            [grad_avg] if centered else None,
            [momentum_buffer] if momentum else None,
            lr=lr,
            alpha=alpha,
            eps=eps,
            weight_decay=wd if weight_decay else 0.0,
            momentum=mom,
            loss_scale=loss_scale if loss_scale_on else 1.0,
            state_steps=[t],
            grad_scale=grad_scale if amp_scale else None,
            found_inf=found_inf if amp_skip else None,
            **options,
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
    """torchair with our pass, on a CompilerConfig of our own (``_torchair.py``)."""
    from ._torchair import make_torchair_backend  # lazy: never at package import
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
    else:
        raise ValueError(f"unknown backend {key.backend!r}; choose one of {BACKENDS}")
    # Callers mark dim 0 of the buffers dynamic (``Bucket.step_args``), so every bucket
    # size shares one graph.
    return torch.compile(fn, backend=_counting(key, compiler), fullgraph=True)


def get_bucket_step(key: StepKey) -> BucketStep:
    """The (compiled) bucket step for ``key``, built on first use and then shared."""
    fn = _cache.get(key)
    if fn is None:
        with _lock:
            fn = _cache.get(key)
            if fn is None:
                fn = _cache[key] = _build(key)
    return fn
