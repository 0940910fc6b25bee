"""Compiled bucket steps, cached by structure only.

A bucket step updates one flat buffer per role (see ``_buckets.py``) by calling
:func:`~npu_optim_compile.rmsprop_step` on one-element lists. Its hyperparameters come
in one tensor, ``[lr, alpha, eps, weight_decay, momentum]``, so the compiled graph
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

import threading
import types
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .functional import rmsprop_step

__all__ = ["BACKENDS", "StepKey", "get_bucket_step", "compile_counts", "clear_cache"]

#: The backends ``NpuFusedRMSprop(backend=...)`` accepts.
BACKENDS = ("auto", "inductor", "torchair", "eager")


@dataclass(frozen=True)
class StepKey:
    """Everything a compiled bucket step depends on. Values never enter it."""

    backend: str  # "inductor", "torchair" or "eager" (resolved, never "auto")
    device_type: str
    dtype: torch.dtype
    centered: bool
    momentum: bool
    weight_decay: bool
    maximize: bool

    def name(self) -> str:
        flags = [f for f in ("centered", "momentum", "weight_decay", "maximize") if getattr(self, f)]
        dtype = str(self.dtype).removeprefix("torch.")
        return "_".join(["rmsprop_bucket_step", self.device_type, dtype, *flags])


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
    centered, momentum, weight_decay, maximize = (
        key.centered,
        key.momentum,
        key.weight_decay,
        key.maximize,
    )

    def step(param, grad, square_avg, grad_avg, momentum_buffer, hyper):
        lr, alpha, eps, wd, mom = hyper.unbind()
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
            centered=centered,
            maximize=maximize,
        )

    code = step.__code__.replace(co_name=key.name(), co_qualname=key.name())
    return types.FunctionType(code, step.__globals__, key.name(), None, step.__closure__)


def _counting(key: StepKey, compiler: Callable) -> Callable:
    def backend(gm: torch.fx.GraphModule, example_inputs):
        _compile_counts[key] += 1
        return compiler(gm, example_inputs)

    return backend


def _inductor_compiler(gm: torch.fx.GraphModule, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def _build(key: StepKey) -> BucketStep:
    fn = _make_python_step(key)
    if key.backend == "eager":
        return fn
    if key.backend == "inductor":
        compiler = _inductor_compiler
    elif key.backend == "torchair":
        from ._torchair import make_torchair_backend  # lazy: never at package import

        compiler = make_torchair_backend()
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
