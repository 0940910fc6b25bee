"""The compiled step: cached by structure, never recompiled by values."""

from __future__ import annotations

import pytest
import torch

from parity import make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop, rmsprop_step
from npu_optim_compile import _bucket_step as _compile


@pytest.fixture
def fresh_cache():
    _compile.clear_cache()
    yield
    _compile.clear_cache()


def total_compiles() -> int:
    return sum(_compile.compile_counts().values())


def test_fifty_scheduled_steps_compile_once(fresh_cache):
    """A scheduler changes lr every step, we change the others by hand: one graph."""
    po = make_params(shapes=[(8, 4), (16,), (3, 3)])
    opt = NpuFusedRMSprop(po, weight_decay=0.1, momentum=0.5, centered=True, backend="inductor")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=60)
    group = opt.param_groups[0]
    for step in range(50):
        set_grads(step, po)
        group["alpha"] = 0.9 + step / 1000
        group["eps"] = 1e-8 * (1 + step)
        group["weight_decay"] = 0.1 / (1 + step)
        group["momentum"] = 0.5 + step / 200
        opt.step()
        sched.step()
    assert total_compiles() == 1
    assert float(opt.state[po[0]]["step"]) == 50


def test_structure_changes_compile_once_each_and_are_shared(fresh_cache):
    """A new structure (dtype, options) compiles once; every optimizer with it shares it."""
    for _ in range(3):
        for kwargs in ({}, {"momentum": 0.9}):
            po = make_params(shapes=[(5,), (2, 2)])
            opt = NpuFusedRMSprop(po, backend="inductor", **kwargs)
            for step in range(2):
                set_grads(step, po)
                opt.step()
    assert total_compiles() == 2
    assert len(_compile.compile_counts()) == 2


def test_eager_backend_never_compiles(fresh_cache):
    po = make_params()
    opt = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    opt.step()
    assert total_compiles() == 0


def test_bucket_sizes_do_not_recompile(fresh_cache):
    """Two groups of different sizes, same structure: one dynamic-shape graph."""
    po = make_params(shapes=[(5,), (64, 3)])
    opt = NpuFusedRMSprop([{"params": po[:1]}, {"params": po[1:]}], backend="inductor")
    for step in range(3):
        set_grads(step, po)
        opt.step()
    assert total_compiles() == 1


def test_tensor_eps_change_takes_effect_under_inductor():
    """Regression: inductor bakes the value of `_foreach_add(xs, tensor)` into the kernel
    (torch 2.13); rmsprop_step must read a 0-d tensor eps at run time."""

    def step(p, g, v, eps):
        rmsprop_step([p], [g], [v], None, None, lr=1.0, alpha=0.0, eps=eps,
                     weight_decay=0, momentum=0, centered=False, maximize=False)

    compiled = torch.compile(step, backend="inductor", fullgraph=True)
    eps = torch.tensor(0.0, dtype=torch.float64)
    results = []
    for value in (0.0, 3.0):
        eps.fill_(value)
        p, g, v = torch.zeros(4), torch.ones(4), torch.zeros(4)
        compiled(p, g, v, eps)
        results.append(p.clone())
    # v = g^2 = 1, so p = -g / (1 + eps)
    torch.testing.assert_close(results[0], torch.full((4,), -1.0))
    torch.testing.assert_close(results[1], torch.full((4,), -0.25))


def test_rmsprop_step_has_no_graph_break():
    def f(ps, gs, vs, ga, mb, lr, alpha, eps, wd, mom):
        rmsprop_step(ps, gs, vs, ga, mb, lr=lr, alpha=alpha, eps=eps, weight_decay=wd,
                     momentum=mom, centered=True, maximize=True)

    n = 3
    ts = [[torch.randn(4) for _ in range(n)] for _ in range(5)]
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (0.01, 0.99, 1e-8, 0.1, 0.9)]
    explanation = torch._dynamo.explain(f)(*ts, *scalars)
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1
