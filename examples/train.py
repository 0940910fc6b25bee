"""Train with NpuFusedRMSprop in the loop people write, and see where its fused step matters.

    python examples/train.py [--steps 60] [--workloads small,many,large,compiled]
                             [--full] [--skip-torch-compile] [--no-baselines]

Each workload trains one model (the same initial weights and batches for every
method) in the loop people write: ``opt.zero_grad()`` (PyTorch's default,
``set_to_none=True``), the model's forward and its own backward, ``opt.step()``. The
methods: ``NpuFusedRMSprop`` (ours), ``torch.optim.RMSprop(foreach=True)`` and
``torch.compile(opt.step)`` (torch's recipe: a tensor lr, so that it never recompiles).

The workloads, and what to expect:

- ``small``: a residual MLP of 36 tensors (1.2 M params), batch 256: the fused step
  does NOT matter here; forward and backward take most of the iteration and 36
  tensors cost torch's foreach step little;
- ``many``: 204 small tensors (50 narrow residual blocks, batch 16): it matters;
  torch's foreach step runs about ten ops per tensor, ours one kernel per dtype
  (``torch.compile(opt.step)`` compiles for minutes at this many tensors: ``--full``);
- ``large``: 12 tensors, 17 M params, batch 8: it matters; the step is memory-bound and
  torch's foreach step reads and writes every buffer once per op, ours once in all;
- ``compiled``: the ``small`` model through a compiled train step, ``compile_train_step``
  and ``torch.compile(train_step)`` with ours against ``torch.compile(train_step)`` with
  torch's RMSprop: it matters for the first call, more so the more tensors (torch's
  step is traced and compiled tensor by tensor inside the train step, ours is one op
  that runs a kernel compiled once); once compiled, torch's step is as fast.

The methods of a workload are timed interleaved in one process: after a warm-up (each
method's first calls, which compile: the first is timed apart), they take turns in
blocks of a few iterations (the order rotating each round), so load from anything else
on the machine falls on all of them alike. The tables give medians and quartiles of
whole iterations and of the step alone. It prints what compiles and how long it took;
the library's own compile log (logger ``npu_optim_compile``, INFO) is shown too. Exits
non-zero if the ``small`` workload's loss did not fall (``--steps`` at least 20).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from npu_optim_compile import NpuFusedRMSprop, compile_train_step

LR = 1e-3
#: Untimed iterations per method before the timed rounds; the first ones compile.
WARMUP = 5
#: Iterations per method per round: the methods take turns in blocks this long.
BLOCK = 5
#: The loss check compares the mean loss of the first and of the last this many steps.
LOSS_WINDOW = 10
MIN_STEPS = 2 * LOSS_WINDOW

class Block(torch.nn.Module):
    """x + gelu(Linear(norm(x))): a weight and a bias, and a LayerNorm's two params."""

    def __init__(self, width: int, norm: bool) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width) if norm else torch.nn.Identity()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.fc(self.norm(x)))


@dataclass(frozen=True)
class Workload:
    name: str
    width: int
    depth: int
    norm: bool
    batch: int
    expect: str  # whether the fused step should make a difference here, and why
    compiled: bool = False  # the compiled train step instead of the eager loop
    slow_torch_compile: bool = False  # torch.compile(opt.step)'s first call takes minutes: only with --full

    def model(self) -> torch.nn.Module:
        torch.manual_seed(1)
        blocks = (Block(self.width, self.norm) for _ in range(self.depth))
        return torch.nn.Sequential(torch.nn.Linear(32, self.width), *blocks, torch.nn.Linear(self.width, 1))


WORKLOADS = {
    "small": Workload("small", 384, 8, True, 256,
                      "the fused step does NOT matter here: forward and backward of a 256-row batch take most "
                      "of the iteration, and 36 tensors cost torch's foreach step little"),
    "many": Workload("many", 32, 50, True, 16,
                     "the fused step matters here: torch's foreach step runs about ten ops per tensor "
                     "(per-tensor work on the CPU), ours one fused kernel per dtype for all of them",
                     slow_torch_compile=True),
    "large": Workload("large", 2048, 4, False, 8,
                      "the fused step matters here: the step is memory-bound, and torch's foreach step reads "
                      "and writes every buffer once per op, ours once in all"),
    "compiled": Workload("compiled", 384, 8, True, 256,
                         "the fused step matters here for the first call: inside torch.compile(train_step) "
                         "torch's RMSprop is traced and compiled tensor by tensor, so its compile grows with "
                         "the tensor count (little at 36 tensors), while ours is one op running a kernel "
                         "compiled once; once compiled, torch's step is as fast as ours", compiled=True),
}


def make_batches(workload: Workload, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Synthetic regression data, one batch per step (the same for every method)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = torch.sin(x @ torch.randn(32, 1, generator=g)) + 0.1 * (x**2).sum(1, keepdim=True)
    out = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (workload.batch,), generator=torch.Generator().manual_seed(step))
        out.append((x[idx], y[idx]))
    return out


def loss_fn(model: torch.nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(xb), yb)


class Method:
    """One way to train a workload's model: its optimizer, its loop, its timings."""

    def __init__(self, name: str, compiles: str, model: torch.nn.Module,
                 iteration: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, float | None]]) -> None:
        self.name, self.compiles, self.model, self._iteration = name, compiles, model, iteration
        self.losses: list[float] = []
        self.iterations: list[float] = []
        self.steps: list[float] = []
        self.first_call = 0.0

    def run(self, xb: torch.Tensor, yb: torch.Tensor, timed: bool = True) -> float:
        start = time.perf_counter()
        loss, step = self._iteration(xb, yb)
        elapsed = time.perf_counter() - start
        self.losses.append(loss.item())
        if timed:
            self.iterations.append(elapsed)
            if step is not None:
                self.steps.append(step)
        return elapsed


def eager_method(name: str, workload: Workload) -> Method:
    """The default loop: zero_grad(), forward, backward, step; the step timed alone too."""
    model = workload.model()
    if name == "NpuFusedRMSprop":
        opt = NpuFusedRMSprop(model.parameters(), lr=LR)
        step, compiles = opt.step, "its fused step kernel (unless an earlier model with the same options did)"
    elif name == "torch.optim.RMSprop(foreach=True)":
        opt = torch.optim.RMSprop(model.parameters(), lr=LR, foreach=True)
        step, compiles = opt.step, ""
    else:  # torch.compile(opt.step), torch's recipe: a tensor lr, so that it never recompiles
        opt = torch.optim.RMSprop(model.parameters(), lr=torch.tensor(LR), foreach=True)
        step, compiles = torch.compile(opt.step), "torch's step, traced tensor by tensor"

    def iteration(xb, yb):
        opt.zero_grad()
        loss = loss_fn(model, xb, yb)
        loss.backward()
        before = time.perf_counter()
        step()
        return loss, time.perf_counter() - before

    return Method(name, compiles, model, iteration)


def compiled_method(name: str, workload: Workload) -> Method:
    """The whole train step compiled; the step is inside the graph and has no time of its own."""
    model = workload.model()
    if name.endswith("torch.optim.RMSprop"):
        opt = torch.optim.RMSprop(model.parameters(), lr=LR, foreach=True)
    else:
        opt = NpuFusedRMSprop(model.parameters(), lr=LR)

    def train_step(xb, yb):
        loss = loss_fn(model, xb, yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = compile_train_step(train_step) if name.startswith("compile_train_step") else torch.compile(train_step)
    return Method(name, "forward, backward and step", model, lambda xb, yb: (compiled(xb, yb), None))


def methods_of(workload: Workload, baselines: bool, torch_compile: bool) -> list[tuple[str, Callable]]:
    """The methods to run; torch_compile: whether torch's compiled baselines run."""
    if workload.compiled:
        names = ["compile_train_step, NpuFusedRMSprop", "torch.compile(train_step), NpuFusedRMSprop"]
        names += ["torch.compile(train_step), torch.optim.RMSprop"] if baselines and torch_compile else []
        return [(n, compiled_method) for n in names]
    names = ["NpuFusedRMSprop"]
    names += ["torch.optim.RMSprop(foreach=True)"] if baselines else []
    names += ["torch.compile(opt.step)"] if baselines and torch_compile else []
    return [(n, eager_method) for n in names]


def measure(workload: Workload, steps: int, baselines: bool, torch_compile: bool) -> list[Method]:
    """Warm each method up, then time them interleaved: in turns of BLOCK iterations each."""
    batches = make_batches(workload, steps)
    methods = []
    for name, build in methods_of(workload, baselines, torch_compile):
        method = build(name, workload)
        if method.compiles:
            print(f"  {name}: the first call compiles {method.compiles} ...", flush=True)
        method.first_call = method.run(*batches[0], timed=False)
        print(f"  {name}: first call {method.first_call:.2f} s", flush=True)
        for i in range(1, WARMUP):
            method.run(*batches[i], timed=False)
        methods.append(method)
    rounds = math.ceil((steps - WARMUP) / BLOCK)
    for r in range(rounds):
        for method in methods[r % len(methods):] + methods[:r % len(methods)]:
            for i in range(WARMUP + r * BLOCK, min(steps, WARMUP + (r + 1) * BLOCK)):
                method.run(*batches[i])
    return methods


def quartiles(times: list[float]) -> tuple[float, float, float]:
    """Median and the first and third quartiles, in ms."""
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else times * 3
    return med * 1e3, q1 * 1e3, q3 * 1e3


def median_ratio(times: list[float], reference: list[float]) -> float:
    return statistics.median(times) / statistics.median(reference)


def cell(times: list[float]) -> str:
    if not times:
        return f"{'-':>22s}"
    med, q1, q3 = quartiles(times)
    return f"{med:8.2f} [{q1:6.2f}-{q3:6.2f}]"


def report(workload: Workload, methods: list[Method], left_out: bool) -> None:
    """The table, what to expect and why, what was measured; ``left_out``: a slow baseline skipped."""
    params = list(methods[0].model.parameters())
    ours = methods[0]
    loop = "compiled train step" if workload.compiled else "loop: opt.zero_grad(), forward, backward, opt.step()"
    print(f"\n{workload.name}: {len(params)} tensors, {sum(p.numel() for p in params):,} params, batch "
          f"{workload.batch}; {loop}")
    print(f"  {'ms: median [quartiles]':48s} {'first call':>10s}  {'iteration':>22s}  {'step alone':>22s}")
    for m in methods:
        print(f"  {m.name:48s} {m.first_call:8.2f} s  {cell(m.iterations)}  {cell(m.steps)}")
    print(f"  expected: {workload.expect}.")
    for other in methods[1:]:
        parts = [f"iteration {median_ratio(other.iterations, ours.iterations):.2f}x ours'"]
        if other.steps:
            share = statistics.median(other.steps) / statistics.median(other.iterations)
            parts.append(f"step {median_ratio(other.steps, ours.steps):.2f}x ours' (the step is {share:.0%} of its "
                         "iteration)")
        if workload.compiled:
            parts.append(f"first call {other.first_call:.1f} s against ours' {ours.first_call:.1f} s")
        print(f"  measured: {other.name}: " + ", ".join(parts))
    if left_out:
        print(f"  (torch.compile(opt.step) left out: at {len(params)} tensors its first call compiles for minutes; "
              "--full includes it)")


def check_loss(method: Method) -> bool:
    first = statistics.mean(method.losses[:LOSS_WINDOW])
    last = statistics.mean(method.losses[-LOSS_WINDOW:])
    if not last < 0.5 * first:
        print(f"FAIL: the mean loss of the last {LOSS_WINDOW} steps ({last:.4f}) is not below half that of the "
              f"first {LOSS_WINDOW} ({first:.4f})", file=sys.stderr)
        return False
    print(f"OK: loss fell: mean of the first {LOSS_WINDOW} steps {first:.4f}, of the last {LOSS_WINDOW} steps "
          f"{last:.4f}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60,
                        help=f"training steps per method and workload (at least {MIN_STEPS}; default 60)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    parser.add_argument("--skip-torch-compile", action="store_true",
                        help="skip torch's compiled baselines (their first calls compile for long)")
    parser.add_argument("--full", action="store_true",
                        help="also torch.compile(opt.step) where its first call compiles for minutes (many)")
    parser.add_argument("--no-baselines", action="store_true", help="ours only")
    args = parser.parse_args()
    if args.steps < MIN_STEPS:
        parser.error(f"--steps {args.steps}: at least {MIN_STEPS} (the loss check compares the mean loss of "
                     f"the first {LOSS_WINDOW} steps with that of the last {LOSS_WINDOW})")
    names = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown or not names:
        parser.error(f"--workloads: unknown {unknown or names}; choose from {', '.join(WORKLOADS)}")

    # torch.optim.Optimizer wraps every step() in a profiler range (``record_function``).
    # Dynamo drops such a range inside torch.compile, warning "Profiler record function
    # ... will be ignored", unless told to keep it in the graph: keep it, so that a
    # compiled step is profiled as an eager one is (torch/_dynamo/config.py).
    if hasattr(torch._dynamo.config, "capture_profiler_record_function"):
        torch._dynamo.config.capture_profiler_record_function = True
    # The library logs each compile (what, and how long it took) on its logger, at INFO.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("    [%(name)s] %(message)s"))
    logging.getLogger("npu_optim_compile").addHandler(handler)
    logging.getLogger("npu_optim_compile").setLevel(logging.INFO)

    ok = True
    for name in names:
        workload = WORKLOADS[name]
        print(f"\n== {name} ==", flush=True)
        start = time.perf_counter()
        slow = workload.slow_torch_compile and not args.full
        torch_compile = not args.skip_torch_compile and not slow
        methods = measure(workload, args.steps, not args.no_baselines, torch_compile)
        report(workload, methods, left_out=slow and not args.skip_torch_compile and not args.no_baselines)
        print(f"  ({time.perf_counter() - start:.0f} s for this workload; losses after {args.steps} steps: "
              + ", ".join(f"{m.losses[-1]:.3g}" for m in methods) + ")")
        if name == "small":
            ok = check_loss(methods[0])
        del methods
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
