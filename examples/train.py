"""Train a small model on synthetic data with NpuFusedRMSprop (default options) on the CPU.

A residual MLP of 36 tensors (1.2 M params). Prints the loss as it falls and the
optimizer step time next to torch.optim.RMSprop's on the same model and data (both
zero their grads with ``set_to_none=False``, which keeps the grads in
NpuFusedRMSprop's flat buffer); exits non-zero if the loss did not fall.

    python examples/train.py [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from npu_optim_compile import NpuFusedRMSprop


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

    return torch.nn.Sequential(
        torch.nn.Linear(32, width), *(Block() for _ in range(depth)), torch.nn.Linear(width, 1)
    )


def make_data(n: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 32, generator=g)
    w = torch.randn(32, 1, generator=g)
    y = torch.sin(x @ w) + 0.1 * (x**2).sum(1, keepdim=True)
    return x, y


def train(opt_name: str, steps: int, log_every: int) -> tuple[list[float], list[float]]:
    model = make_model(seed=1)
    if opt_name == "NpuFusedRMSprop":
        opt = NpuFusedRMSprop(model.parameters(), lr=1e-3)
    else:
        opt = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    x, y = make_data()
    losses, step_times = [], []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (256,), generator=torch.Generator().manual_seed(step))
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        # Keep the grads allocated (as torch_npu's fused optimizers require): backward
        # accumulates straight into NpuFusedRMSprop's flat grad buffer. Both optimizers
        # do the same here.
        opt.zero_grad(set_to_none=False)
        loss.backward()
        start = time.perf_counter()
        opt.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"  {opt_name:16s} step {step:4d}  loss {loss.item():.4f}")
    return losses, step_times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    print("Training with NpuFusedRMSprop (the first step compiles the fused kernel):")
    t0 = time.perf_counter()
    losses, ours = train("NpuFusedRMSprop", args.steps, log_every=50)
    print(f"  first step (compile) {ours[0]:.2f} s, whole run {time.perf_counter() - t0:.1f} s")
    print("Same model and data with torch.optim.RMSprop:")
    ref_losses, theirs = train("torch.optim.RMSprop", args.steps, log_every=0)
    print(f"  final loss {ref_losses[-1]:.4f} (ours {losses[-1]:.4f})")

    ours_ms = statistics.median(ours[10:]) * 1e3
    theirs_ms = statistics.median(theirs[10:]) * 1e3
    params = list(make_model(1).parameters())
    n_params = sum(p.numel() for p in params)
    print(f"optimizer step, median over steps 10..{args.steps - 1} ({len(params)} tensors, {n_params:,} params):")
    print(f"  NpuFusedRMSprop      {ours_ms:7.3f} ms")
    print(f"  torch.optim.RMSprop  {theirs_ms:7.3f} ms   ({theirs_ms / ours_ms:.1f}x ours)")

    start, end = statistics.mean(losses[:10]), statistics.mean(losses[-10:])
    if not end < 0.5 * start:
        print(f"FAIL: the loss did not fall enough ({start:.4f} -> {end:.4f})", file=sys.stderr)
        return 1
    print(f"OK: loss fell from {start:.4f} to {end:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
