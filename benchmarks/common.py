"""What the benchmarks measure and how they time it: the models, the run settings and
the timing helpers, shared by the parent process and the workers.

Nothing here imports torch at module import time (the parent's ``--table`` and
``--plot`` never need it); the helpers that use torch import it when called.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

#: Learning rate of every optimizer in the step-only measurements.
STEP_LR = 1e-2
#: Learning rate of the training loops: small, so that a few hundred iterations on the
#: same few batches leave the network in its regime (no saturated tanh, no denormal grads).
LOOP_LR = 1e-4

# ----------------------------------------------------------------------------------
# Models. ``tensors``: the step-only measurements' params, (count, shape, dtype) with
# random grads set by hand. ``net``: the network of the training-loop measurements (a
# real torch.nn module with its own backward): ``blocks`` residual blocks
# ``x + tanh(Linear(width, width)(x))`` over a batch of ``batch`` rows.
# ----------------------------------------------------------------------------------

MODELS: dict[str, dict] = {
    "10x4M": dict(
        desc="10 fp32 tensors, 4 M params",
        tensors=[(10, (400, 1000), "float32")],
        options={},
    ),
    "200x4M": dict(
        desc="200 fp32 tensors, 4 M params",
        tensors=[(200, (100, 200), "float32")],
        options={},
        net=dict(blocks=100, width=200, batch=8),
    ),
    "1000x4M": dict(
        desc="1000 fp32 tensors, 4 M params",
        tensors=[(1000, (40, 100), "float32")],
        options={},
    ),
    "1000tiny": dict(
        desc="1000 fp32 tensors of 100 elements (0.1 M params)",
        tensors=[(1000, (100,), "float32")],
        options={},
        net=dict(blocks=500, width=10, batch=8),
    ),
    "20x50M": dict(
        desc="20 fp32 tensors, 50 M params",
        tensors=[(20, (1250, 2000), "float32")],
        options={},
    ),
    "mixed": dict(
        desc="100 fp32 + 100 bf16 tensors, 4 M params",
        tensors=[(100, (100, 200), "float32"), (100, (100, 200), "bfloat16")],
        options={},
    ),
    "centered_mom": dict(
        desc="200 fp32 tensors, 4 M params, centered, momentum 0.9",
        tensors=[(200, (100, 200), "float32")],
        options=dict(centered=True, momentum=0.9),
    ),
    # The smoke run's model (tests/repo/test_benchmarks.py): seconds, not minutes.
    "tiny": dict(
        desc="8 fp32 tensors (4 x 8x8 + 4 x 8), 288 params: the smoke run's model",
        tensors=[(4, (8, 8), "float32"), (4, (8,), "float32")],
        options={},
        net=dict(blocks=4, width=8, batch=4),
    ),
}
DEFAULT_MODELS = ["200x4M", "1000tiny", "10x4M", "1000x4M", "centered_mom", "mixed", "20x50M"]

LOOPS = ("default", "kept", "compiled")
#: Every method of the training loops, in table order. ``ours_cts`` and ``no_step``
#: exist only in the compiled loop.
LOOP_METHODS = ("ours", "ours_cts", "tc_step", "foreach", "for_loop", "no_step")
EAGER_LOOP_METHODS = ("ours", "tc_step", "foreach", "for_loop")
COMPILED_LOOP_METHODS = ("no_step", "ours", "ours_cts", "tc_step", "foreach", "for_loop")


def is_torch_compile_baseline(loop: str, method: str) -> bool:
    """The slow compiles of torch's own optimizer: ``torch.compile(opt.step)`` in the eager
    loops and any ``torch.optim.RMSprop`` inside the compiled train step."""
    return method == "tc_step" or (loop == "compiled" and method in ("foreach", "for_loop"))


def net_summary(net: dict) -> dict:
    w, n = net["width"], net["blocks"]
    return {
        "desc": f"{n} residual blocks x + tanh(Linear({w}, {w})(x)), batch {net['batch']}, "
        f"MSE loss against random targets",
        "blocks": n,
        "width": w,
        "batch": net["batch"],
        "tensors": 2 * n,
        "numel": n * (w * w + w),
        "lr": LOOP_LR,
    }


#: Bytes an fp32 RMSprop step must move per parameter (read p, g, v; write p, v),
#: plus 8 (read + write) for each of grad_avg and momentum_buffer.
def bytes_per_param_fp32(options: dict) -> int:
    return 20 + 8 * bool(options.get("centered")) + 8 * (options.get("momentum", 0) > 0)


ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_numel(spec: dict) -> int:
    return sum(count * math.prod(shape) for count, shape, _ in spec["tensors"])


def model_tensor_count(spec: dict) -> int:
    return sum(count for count, _, _ in spec["tensors"])


def floor_bytes(spec: dict) -> int:
    per = bytes_per_param_fp32(spec["options"])
    return sum(
        count * math.prod(shape) * per * ELEMENT_SIZE[dtype] // 4
        for count, shape, dtype in spec["tensors"]
    )


def largest_bucket_bytes(spec: dict) -> int:
    """Bytes of the largest flat param buffer: one bucket per (group, device, dtype), and
    every model here is one group on one device."""
    per_dtype: dict[str, int] = {}
    for count, shape, dtype in spec["tensors"]:
        per_dtype[dtype] = per_dtype.get(dtype, 0) + count * math.prod(shape) * ELEMENT_SIZE[dtype]
    return max(per_dtype.values())


# ----------------------------------------------------------------------------------
# Settings and timing (used inside the workers).
# ----------------------------------------------------------------------------------


class Settings:
    def __init__(self, quick: bool, device: str):
        self.device = device
        if quick:
            self.warmup, self.min_repeats, self.max_repeats, self.budget_s = 2, 5, 200, 0.4
            self.triad_numel = 1 << 24
        else:
            self.warmup, self.min_repeats, self.max_repeats, self.budget_s = 5, 25, 1000, 2.5
            self.triad_numel = 1 << 25  # 3 x 128 MiB fp32, far beyond any CPU cache
        if device == "cuda":
            self.triad_numel = 1 << 28  # 3 x 1 GiB

    def enough(self, n: int, elapsed: float) -> bool:
        """Whether ``n`` timed repeats over ``elapsed`` seconds are enough."""
        return n >= self.max_repeats or (n >= self.min_repeats and elapsed >= self.budget_s)


def sync_fn(device: str):
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def summarize(times: list[float]) -> dict:
    times_sorted = sorted(times)
    n = len(times_sorted)
    q = statistics.quantiles(times_sorted, n=4) if n >= 2 else [times_sorted[0]] * 3
    return {
        "median_s": statistics.median(times_sorted),
        "p25_s": q[0],
        "p75_s": q[2],
        "min_s": times_sorted[0],
        "n": n,
    }


def time_steps(step, st: Settings, before=None, warmup: int | None = None) -> dict:
    """Median (and quartiles) of ``step()`` alone, after ``warmup`` untimed calls.

    ``before()`` runs untimed before every call (e.g. to allocate fresh grads).
    Repeats until both ``min_repeats`` and ``budget_s`` are reached (or ``max_repeats``).
    """
    sync = sync_fn(st.device)
    for _ in range(st.warmup if warmup is None else warmup):
        if before is not None:
            before()
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while not st.enough(len(times), time.perf_counter() - start):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return summarize(times)
