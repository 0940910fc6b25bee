"""torch.optim's contracts beyond the math, side by side with torch.optim.RMSprop:
step() leaves each .grad alone, and optimizer.state and its hooks accept what torch's
accept."""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop

TOL = TOLERANCES[torch.float32]


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("loop", ["user_set", "kept"])
def test_step_never_replaces_or_writes_a_grad(loop, backend):
    """Same object, same autograd version, same values, at the first step and later:
    for grads the user set (as autograd sets fresh ones) and for grads that live in our
    flat buffer after zero_grad(set_to_none=False)."""
    po = make_params()
    ours = NpuFusedRMSprop(po, momentum=0.5, backend=backend)
    for step in range(4):
        if loop == "user_set" or step == 0:
            set_grads(step, po)
        else:
            ours.zero_grad(set_to_none=False)
            for p in po:
                p.grad.add_(0.5)
        before = [(p.grad, p.grad._version, p.grad.clone()) for p in po]
        ours.step()
        for i, (p, (g, version, values)) in enumerate(zip(po, before)):
            assert p.grad is g, (step, i)
            assert p.grad._version == version, (step, i)
            assert torch.equal(p.grad, values), (step, i)


def test_torch_also_leaves_grads_alone():
    """The reference for the contract above (so that test could fail for torch too)."""
    pr = make_params()
    ref = torch.optim.RMSprop(pr, momentum=0.5)
    set_grads(0, pr)
    before = [(p.grad, p.grad._version) for p in pr]
    ref.step()
    assert all(p.grad is g and p.grad._version == v for p, (g, v) in zip(pr, before))


def _hooks(record: list):
    """Hooks as in PyTorch's own optimizer tests: they store plain values (an int, a
    bool) under string keys of optimizer.state."""

    def state_dict_pre(opt):
        opt.state["pre_count"] = opt.state.get("pre_count", 0) + 1

    def state_dict_post(opt, state_dict):
        state_dict["state"]["post_ran"] = True
        record.append("sd_post")
        return state_dict

    def load_pre(opt, state_dict):
        state_dict["param_groups"][0]["lr"] = 0.002
        record.append("load_pre")
        return state_dict

    def load_post(opt):
        opt.state["loaded"] = True
        opt.state["load_count"] = opt.state.get("load_count", 0) + 1

    return state_dict_pre, state_dict_post, load_pre, load_post


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_every_state_dict_hook_kind_with_plain_values_in_state(backend):
    po = make_params()
    pr = clone_params(po)
    results = []
    for params, make in ((po, lambda ps: NpuFusedRMSprop(ps, momentum=0.5, backend=backend)),
                         (pr, lambda ps: torch.optim.RMSprop(ps, momentum=0.5))):
        record: list = []
        opt = make(params)
        pre, post, load_pre, load_post = _hooks(record)
        opt.register_state_dict_pre_hook(pre)
        opt.register_state_dict_post_hook(post)
        opt.register_load_state_dict_pre_hook(load_pre)
        opt.register_load_state_dict_post_hook(load_post)
        for step in range(3):
            set_grads(step, params)
            opt.step()
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        for step in range(3, 6):
            set_grads(step, params)
            opt.step()
        sd2 = opt.state_dict()
        results.append((opt, record, sd, sd2))
    (ours, rec_o, sd_o, sd2_o), (ref, rec_r, sd_r, sd2_r) = results
    assert rec_o == rec_r
    for key in ("pre_count", "post_ran"):
        assert sd_o["state"][key] == sd_r["state"][key]
    assert ours.state["loaded"] is True and ours.state["load_count"] == ref.state["load_count"] == 1
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"] == 0.002
    assert sd2_o["state"]["pre_count"] == sd2_r["state"]["pre_count"]
    assert_same_state_params_only(ours, ref, po, pr)


def assert_same_state_params_only(ours, ref, po, pr):
    """assert_same_state over the per-parameter entries (hooks added other keys)."""

    class View:
        def __init__(self, opt):
            self.state = {p: v for p, v in opt.state.items() if isinstance(p, torch.Tensor)}

    assert_same_state(View(ours), View(ref), po, pr, **TOL)


def test_state_accepts_any_value_under_any_key():
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    ours.state["an_int"] = 3
    ours.state["a_bool"] = False
    ours.state["a_list"] = [1, 2]
    set_grads(0, po)
    ours.step()
    sd = ours.state_dict()
    assert sd["state"]["an_int"] == 3 and sd["state"]["a_bool"] is False
    ours.load_state_dict(sd)
    set_grads(1, po)
    ours.step()
    assert ours.state["a_list"] == [1, 2]
