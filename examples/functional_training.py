"""Jax-style training: a pure train step compiled whole with ``torch.compile(fullgraph=True)``.

The model is only a function (``torch.func.functional_call``); params and optimizer
state are pytrees passed in and returned. ``torch.func.grad`` takes the gradient and
:func:`npu_optim_compile.rmsprop_update` the step, so the step mutates nothing and is
one graph. The trajectory is NpuFusedRMSprop's on the same model.

    python examples/functional_training.py [--steps 200] [--backend inductor]
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.func import functional_call, grad_and_value

from npu_optim_compile import rmsprop_init, rmsprop_update

#: RMSprop options; lr is a 0-d tensor so a schedule never recompiles the step.
OPTIONS = dict(alpha=0.9, momentum=0.5, centered=True, weight_decay=1e-4)


def make_model(seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))


def make_data(n: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 16, generator=g)
    y = torch.sin(x @ torch.randn(16, 1, generator=g))
    return x, y


def batch(x, y, step: int, size: int = 64):
    idx = torch.randint(0, x.shape[0], (size,), generator=torch.Generator().manual_seed(step))
    return x[idx], y[idx]


def make_train_step(model: torch.nn.Module):
    """``(params, state, lr, x, y) -> (params, state, loss)``, pure."""

    def loss_fn(params, x, y):
        return torch.nn.functional.mse_loss(functional_call(model, params, (x,)), y)

    def train_step(params, state, lr, x, y):
        grads, loss = grad_and_value(loss_fn)(params, x, y)
        params, state = rmsprop_update(params, grads, state, lr=lr, **OPTIONS)
        return params, state, loss

    return train_step


def train(steps: int, backend: str, lr: float = 1e-2):
    """Train ``steps`` steps with lr halved every 50; return (params, state, losses)."""
    model = make_model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = rmsprop_init(params, momentum=OPTIONS["momentum"], centered=OPTIONS["centered"])
    step_fn = torch.compile(make_train_step(model), backend=backend, fullgraph=True)
    lr_t = torch.tensor(lr)
    x, y = make_data()
    losses = []
    for step in range(steps):
        lr_t.fill_(lr * 0.5 ** (step // 50))
        params, state, loss = step_fn(params, state, lr_t, *batch(x, y, step))
        losses.append(float(loss))
    return params, state, losses


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    _, _, losses = train(args.steps, args.backend)
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {step:4d}  loss {losses[step]:.4f}")
    print(f"final loss {losses[-1]:.4f} (first {losses[0]:.4f})")
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(main())
