"""Helpers shared by the tests: models, gradient streams, side-by-side runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SHAPES = [(4, 3), (7,), (2, 3, 2), ()]

#: Tolerances for comparing against torch.optim.RMSprop after 20 steps, per dtype.
#: fp32/fp64: the issue's rtol (1e-6 for fp32); atol covers values that pass near 0.
#: Observed (20 steps, all options on): fp32 params 1.2e-7 abs / 3e-7 rel, state 4.8e-7
#: abs (momentum buffers of magnitude ~10); fp64 2e-16.
#: fp16/bf16: torch rounds after each of its ops (addcmul once, in fp32), the foreach
#: sequence after each of its ops, the compiled kernel once per output: 1-2 ulps apart
#: per step. Observed: fp16 2e-3 abs (2 ulps at 1), bf16 7.8e-3 abs (1 ulp at 1) and
#: 3.1e-2 on momentum buffers of magnitude ~8 (1 ulp there).
TOLERANCES = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.complex64: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if dtype.is_complex:
            t = torch.randn(shape, generator=g, dtype=dtype)
        else:
            t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        out.append(torch.nn.Parameter(t))
    return out


def clone_params(params: Sequence[Tensor]) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(step: int, *param_lists: Sequence[Tensor], skip: Callable[[int, int], bool] | None = None):
    """Give every list the same pseudo-random grads for ``step`` (None where skip(step, i))."""
    g = torch.Generator().manual_seed(1000 + step)
    first = param_lists[0]
    for i, p in enumerate(first):
        grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if p.is_complex():
            grad = torch.complex(grad, torch.randn(p.shape, generator=g, dtype=torch.float64))
        for params in param_lists:
            q = params[i]
            q.grad = None if skip is not None and skip(step, i) else grad.to(q.dtype).clone()


def assert_same_state(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, params_ours, params_ref, **tol):
    """Params and every state buffer equal (within tol) between two optimizers."""
    for i, (p, q) in enumerate(zip(params_ours, params_ref)):
        torch.testing.assert_close(p.detach(), q.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        so, sr = ours.state.get(p, {}), ref.state.get(q, {})
        assert set(so) == set(sr), f"param {i}: state keys {sorted(so)} != {sorted(sr)}"
        for key in sr:
            if key == "step":
                assert float(so[key]) == float(sr[key]), f"param {i}: step {so[key]} != {sr[key]}"
            else:
                torch.testing.assert_close(so[key], sr[key], **tol, msg=lambda m: f"param {i} {key}: {m}")


def run_side_by_side(make_opt, kwargs, *, dtype=torch.float32, steps=20, skip=None, shapes=SHAPES):
    """Run ours and torch.optim.RMSprop on the same grads; return both and their params."""
    params_ours = make_params(dtype, shapes)
    params_ref = clone_params(params_ours)
    ours = make_opt(params_ours, **kwargs)
    ref = torch.optim.RMSprop(params_ref, **kwargs)
    for step in range(steps):
        set_grads(step, params_ours, params_ref, skip=skip)
        ours.step()
        ref.step()
    return ours, ref, params_ours, params_ref
