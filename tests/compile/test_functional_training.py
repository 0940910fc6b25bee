"""examples/functional_training.py: the pure train step mutates nothing, compiles to one
graph that a new lr does not recompile, and follows NpuFusedRMSprop's trajectory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils import _pytree as pytree

from npu_optim_compile import NpuFusedRMSprop, rmsprop_init
from tolerances import assert_close_at_scale, tolerance

TOL = tolerance(torch.float32)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "functional_training.py"
LRS = [0.01, 0.01, 0.005, 0.0025, 0.0025, 0.001]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("functional_training", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def start(example):
    model = example.make_model()
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = rmsprop_init(params, momentum=example.OPTIONS["momentum"], centered=example.OPTIONS["centered"])
    return model, params, state


def test_pure_step_mutates_nothing(example):
    model, params, state = start(example)
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    step_fn = torch.compile(example.make_train_step(model), backend=counting_backend, fullgraph=True)
    x, y = example.batch(*example.make_data(), 0)
    lr = torch.tensor(0.01)
    inputs = (params, state, lr, x, y)
    before = pytree.tree_map(lambda t: t.clone(), inputs)
    new_params, new_state, _ = step_fn(*inputs)
    for old, now in zip(pytree.tree_leaves(before), pytree.tree_leaves(inputs)):
        assert torch.equal(old, now)
    in_ptrs = {t.data_ptr() for t in pytree.tree_leaves(inputs)}
    assert not in_ptrs & {t.data_ptr() for t in pytree.tree_leaves((new_params, new_state))}
    assert not torch.equal(new_params["0.weight"], params["0.weight"])  # it did step
    lr.fill_(0.001)  # a new lr: the same graph
    step_fn(new_params, new_state, lr, x, y)
    assert len(graphs) == 1


def test_follows_npu_fused_rmsprop(example):
    """aot_eager: through AOT autograd's functionalization, as inductor sees it."""
    model, params, state = start(example)
    step_fn = torch.compile(example.make_train_step(model), backend="aot_eager", fullgraph=True)
    ref_model = example.make_model()
    opt = NpuFusedRMSprop(ref_model.parameters(), lr=LRS[0], backend="eager", **example.OPTIONS)
    x, y = example.make_data()
    lr = torch.tensor(LRS[0])
    for step, value in enumerate(LRS):
        xb, yb = example.batch(x, y, step)
        lr.fill_(value)
        params, state, loss = step_fn(params, state, lr, xb, yb)
        opt.param_groups[0]["lr"] = value
        ref_loss = torch.nn.functional.mse_loss(ref_model(xb), yb)
        opt.zero_grad()
        ref_loss.backward()
        opt.step()
        assert_close_at_scale(loss, ref_loss.detach(), **TOL)
    for name, p in ref_model.named_parameters():
        # lr is a float32 tensor here and a Python float there: observed 6e-8 abs.
        assert_close_at_scale(params[name], p.detach(), **TOL, msg=name)
        assert_close_at_scale(state.square_avg[name], opt.state[p]["square_avg"], **TOL, msg=name)


def test_main_trains(example, capsys):
    assert example.main(["--steps", "40", "--backend", "eager"]) == 0
    assert "final loss" in capsys.readouterr().out
