"""The pure, jax-style API: pytrees in, new pytrees out, nothing mutated."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, grad

from parity import make_params, set_grads
from tolerances import assert_close_at_scale, tolerance
from npu_optim_compile import NpuFusedRMSprop, RMSpropState, rmsprop_init, rmsprop_update

OPTIONS = [
    {},
    {"momentum": 0.9, "centered": True, "weight_decay": 0.01, "maximize": True},
]


def tree(params):
    return {"w": params[0], "inner": [params[1], (params[2],)], "b": params[3]}


def snapshot(x):
    return torch.utils._pytree.tree_map(lambda t: (t.data_ptr(), t.detach().clone()), x)


def assert_unchanged(before, x):
    flat_b = torch.utils._pytree.tree_leaves(before, is_leaf=lambda v: isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int))
    flat_x = torch.utils._pytree.tree_leaves(x)
    for (ptr, value), t in zip(flat_b, flat_x):
        assert t.data_ptr() == ptr
        assert torch.equal(t, value)


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "all_options"])
def test_nothing_is_mutated_and_structure_is_kept(options):
    params = tree([p.detach() for p in make_params()])
    grads = torch.utils._pytree.tree_map(torch.randn_like, params)
    state = rmsprop_init(params, momentum=options.get("momentum", 0), centered=options.get("centered", False))
    before = [snapshot(params), snapshot(grads), snapshot(state.square_avg), int(state.step)]
    new_params, new_state = rmsprop_update(params, grads, state, lr=0.1, **options)
    assert_unchanged(before[0], params)
    assert_unchanged(before[1], grads)
    assert_unchanged(before[2], state.square_avg)
    assert int(state.step) == before[3] and int(new_state.step) == before[3] + 1
    assert torch.utils._pytree.tree_structure(new_params) == torch.utils._pytree.tree_structure(params)
    assert isinstance(new_state, RMSpropState)
    assert not torch.equal(new_params["w"], params["w"])


@pytest.mark.parametrize("options", OPTIONS, ids=["default", "all_options"])
def test_follows_npufused_and_torch_trajectory(options):
    po = make_params()
    opt = NpuFusedRMSprop(po, lr=0.02, backend="eager", **options)
    ref_params = [p.detach().clone() for p in make_params()]
    params = tree(ref_params)
    state = rmsprop_init(params, momentum=options.get("momentum", 0), centered=options.get("centered", False))
    holders = [torch.nn.Parameter(torch.zeros_like(p)) for p in ref_params]  # grads carrier
    for step in range(20):
        set_grads(step, po, holders)
        grads = tree([h.grad for h in holders])
        opt.step()
        params, state = rmsprop_update(params, grads, state, lr=0.02, **options)
    flat = torch.utils._pytree.tree_leaves(params)
    for p, q in zip(po, flat):
        assert_close_at_scale(q, p.detach(), **tolerance(p.dtype))
    for p, q in zip(po, torch.utils._pytree.tree_leaves(state.square_avg)):
        assert_close_at_scale(q, opt.state[p]["square_avg"], **tolerance(p.dtype))


def test_compiles_fullgraph_and_matches_eager():
    params = {"a": torch.randn(8, 4), "b": torch.randn(4)}
    grads = {"a": torch.randn(8, 4), "b": torch.randn(4)}
    state = rmsprop_init(params, momentum=0.5, centered=True)
    lr = torch.tensor(0.05, dtype=torch.float64)

    def update(params, grads, state, lr):
        return rmsprop_update(params, grads, state, lr=lr, momentum=0.5, centered=True)

    explanation = torch._dynamo.explain(update)(params, grads, state, lr)
    assert explanation.graph_break_count == 0
    compiled = torch.compile(update, fullgraph=True, backend="inductor")
    got_p, got_s = compiled(params, grads, state, lr)
    want_p, want_s = update(params, grads, state, lr)
    for got, want in ((got_p, want_p), (got_s.momentum_buffer, want_s.momentum_buffer)):
        for key in want:
            assert_close_at_scale(got[key], want[key], **tolerance(torch.float32), msg=key)
    assert int(got_s.step) == 1


def test_torch_func_training_loop_learns():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(64, 3)
    y = (x**2).sum(1, keepdim=True)

    def loss_fn(p):
        return torch.nn.functional.mse_loss(functional_call(model, p, (x,)), y)

    state = rmsprop_init(params)
    first = float(loss_fn(params))
    for _ in range(100):
        params, state = rmsprop_update(params, grad(loss_fn)(params), state, lr=0.01)
    assert float(loss_fn(params)) < 0.5 * first
    assert int(state.step) == 100


def test_initial_square_avg():
    state = rmsprop_init({"w": torch.zeros(3)}, initial_square_avg=1.0)
    assert torch.equal(state.square_avg["w"], torch.ones(3))
    assert state.grad_avg is None and state.momentum_buffer is None


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(centered=True), ValueError, "centered=True needs a state with grad_avg"),
        (dict(momentum=0.9), ValueError, "momentum needs a state with a momentum buffer"),
        (dict(lr=-1.0), ValueError, "Invalid learning rate: -1.0"),
    ],
)
def test_errors(kwargs, error, message):
    params = {"w": torch.zeros(3)}
    with pytest.raises(error, match=message):
        rmsprop_update(params, {"w": torch.ones(3)}, rmsprop_init(params), **kwargs)


def test_structure_mismatch_and_bad_leaves():
    params = {"w": torch.zeros(3)}
    with pytest.raises(ValueError, match="same pytree structure"):
        rmsprop_update(params, {"v": torch.ones(3)}, rmsprop_init(params))
    with pytest.raises(TypeError, match="torch.int64"):
        rmsprop_init({"w": torch.zeros(3, dtype=torch.int64)})
