"""Train a small model on synthetic data with NpuFusedRMSprop, in the loop people write.

A residual MLP of 36 tensors (1.2 M params), trained with ``opt.zero_grad()`` (PyTorch's
default, ``set_to_none=True``), the model's own backward and ``opt.step()``. Prints the
loss as it falls, then the median time of a whole iteration (zero_grad + forward +
backward + step) and of the step alone, next to ``torch.optim.RMSprop`` (foreach) and
``torch.compile(opt.step)`` on the same model and data. Exits non-zero if the loss did
not fall.

    python examples/train.py [--steps 200] [--compile] [--no-baselines]

``--compile`` trains through a compiled train step instead
(``compile_train_step(train_step)``: forward, backward, step and zero_grad in
``torch.compile``); the step then has no time of its own, so only iterations are shown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch

from npu_optim_compile import NpuFusedRMSprop, compile_train_step

LR = 1e-3


def make_model(seed: int, width: int = 384, depth: int = 8) -> torch.nn.Module:
    """A residual MLP: every block adds a weight, a bias and a LayerNorm's two params,
    so the optimizer sees many tensors, as in real models."""
    torch.manual_seed(seed)

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = torch.nn.LayerNorm(width)
            self.fc = torch.nn.Linear(width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.nn.functional.gelu(self.fc(self.norm(x)))

    return torch.nn.Sequential(torch.nn.Linear(32, width), *(Block() for _ in range(depth)), torch.nn.Linear(width, 1))


def make_data(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * (x**2).sum(1, keepdim=True)
    return x, y


def batch(x: torch.Tensor, y: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, x.shape[0], (256,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def make_optimizer(name: str, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """The optimizer and the step function the loop calls."""
    if name == "NpuFusedRMSprop":
        opt = NpuFusedRMSprop(model.parameters(), lr=LR)
        return opt, opt.step
    if name == "torch.optim.RMSprop":
        opt = torch.optim.RMSprop(model.parameters(), lr=LR, foreach=True)
        return opt, opt.step
    # torch.compile(opt.step): torch's recipe, a tensor lr so that it never recompiles
    opt = torch.optim.RMSprop(model.parameters(), lr=torch.tensor(LR), foreach=True)
    return opt, torch.compile(opt.step)


def train(name: str, steps: int, log_every: int) -> dict:
    """The default loop; returns losses, iteration and step times (seconds)."""
    model = make_model(seed=1)
    opt, step_fn = make_optimizer(name, model)
    x, y = make_data()
    losses, iterations, step_times = [], [], []
    for step in range(steps):
        xb, yb = batch(x, y, step)
        start = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        before_step = time.perf_counter()
        step_fn()
        end = time.perf_counter()
        iterations.append(end - start)
        step_times.append(end - before_step)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {name:26s} step {step:4d}  loss {losses[-1]:.4f}")
    return dict(losses=losses, iteration=iterations, step=step_times)


def train_compiled(steps: int, log_every: int) -> dict:
    """The same training through compile_train_step."""
    model = make_model(seed=1)
    opt = NpuFusedRMSprop(model.parameters(), lr=LR)
    x, y = make_data()

    def train_step(xb, yb):
        loss = torch.nn.functional.mse_loss(model(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    compiled = compile_train_step(train_step)
    losses, iterations = [], []
    for step in range(steps):
        xb, yb = batch(x, y, step)
        start = time.perf_counter()
        loss = compiled(xb, yb)
        iterations.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {'compile_train_step':26s} step {step:4d}  loss {losses[-1]:.4f}")
    return dict(losses=losses, iteration=iterations, step=None)


def ms(times: list[float], skip: int) -> float:
    return statistics.median(times[skip:]) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--compile", action="store_true", help="train through compile_train_step")
    parser.add_argument("--no-baselines", action="store_true", help="skip torch's optimizers")
    args = parser.parse_args()
    skip = min(10, args.steps // 4)  # the first iterations compile: not in the medians

    t0 = time.perf_counter()
    if args.compile:
        print("Training through compile_train_step (the first call compiles the train step):")
        ours = train_compiled(args.steps, log_every=50)
        label = "compile_train_step(NpuFusedRMSprop)"
    else:
        print("Training with NpuFusedRMSprop (the first step compiles the fused kernel):")
        ours = train("NpuFusedRMSprop", args.steps, log_every=50)
        label = "NpuFusedRMSprop"
    print(f"  first iteration {ours['iteration'][0]:.2f} s, whole run {time.perf_counter() - t0:.1f} s")

    results = {label: ours}
    if not args.no_baselines:
        for name in ("torch.optim.RMSprop", "torch.compile(opt.step)"):
            print(f"Same model and data with {name}:")
            results[name] = train(name, args.steps, log_every=0)

    params = list(make_model(1).parameters())
    print(
        f"\nMedians over iterations {skip}..{args.steps - 1} ({len(params)} tensors, "
        f"{sum(p.numel() for p in params):,} params; loop: opt.zero_grad(), forward, backward, step):"
    )
    print(f"  {'':38s} {'iteration':>10s} {'step':>10s}")
    ours_iter = ms(ours["iteration"], skip)
    for name, res in results.items():
        it = ms(res["iteration"], skip)
        step = f"{ms(res['step'], skip):7.3f} ms" if res["step"] is not None else "         -"
        ratio = "" if name == label else f"   ({it / ours_iter:.2f}x ours' iteration)"
        print(f"  {name:38s} {it:7.2f} ms {step}{ratio}")

    first, last = statistics.mean(ours["losses"][:10]), statistics.mean(ours["losses"][-10:])
    if not last < 0.5 * first:
        print(f"FAIL: the mean loss of the last 10 steps ({last:.4f}) is not below half that of the first 10 ({first:.4f})",
              file=sys.stderr)
        return 1
    print(f"OK: loss fell: mean of the first 10 steps {first:.4f}, of the last 10 steps {last:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
