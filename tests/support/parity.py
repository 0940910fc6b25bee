"""Helpers shared by the tests: models, gradient streams, side-by-side runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from tolerances import TOLERANCES, assert_close_at_scale  # TOLERANCES: tests import it from here

SHAPES = [(4, 3), (7,), (2, 3, 2), ()]


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
    """Params and every state buffer equal (within tol, atol at each tensor's scale) between two optimizers."""
    for i, (p, q) in enumerate(zip(params_ours, params_ref)):
        assert_close_at_scale(p.detach(), q.detach(), **tol, msg=lambda m: f"param {i}: {m}")
        so, sr = ours.state.get(p, {}), ref.state.get(q, {})
        assert set(so) == set(sr), f"param {i}: state keys {sorted(so)} != {sorted(sr)}"
        for key in sr:
            if key == "step":
                assert float(so[key]) == float(sr[key]), f"param {i}: step {so[key]} != {sr[key]}"
            else:
                assert_close_at_scale(so[key], sr[key], **tol, msg=lambda m: f"param {i} {key}: {m}")


def run_side_by_side(make_opt, kwargs, *, dtype=torch.float32, steps=20, skip=None, shapes=SHAPES,
                     params=None, groups=None):
    """Run ours and torch.optim.RMSprop on the same grads; return both and their params.

    ``params``: (ours, torch's) param lists (torch's None: clones of ours); default
    ``make_params(dtype, shapes)``. ``groups``: builds each optimizer's param groups
    from its param list (default: the list itself)."""
    params_ours, params_ref = params if params is not None else (make_params(dtype, shapes), None)
    if params_ref is None:
        params_ref = clone_params(params_ours)
    groups = groups or (lambda ps: ps)
    ours = make_opt(groups(params_ours), **kwargs)
    ref = torch.optim.RMSprop(groups(params_ref), **kwargs)
    for step in range(steps):
        set_grads(step, params_ours, params_ref, skip=skip)
        ours.step()
        ref.step()
    return ours, ref, params_ours, params_ref
