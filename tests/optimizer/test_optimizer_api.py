"""The torch.optim.Optimizer API: errors, hooks, groups, printing, copies, schedulers."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_error_inputs_func_rmsprop

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop

TOL = TOLERANCES[torch.float32]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": -0.1}, "Invalid learning rate: -0.1"),
        ({"eps": -1e-8}, "Invalid epsilon value: -1e-08"),
        ({"momentum": -0.5}, "Invalid momentum value: -0.5"),
        ({"weight_decay": -1.0}, "Invalid weight_decay value: -1.0"),
        ({"alpha": -0.9}, "Invalid alpha value: -0.9"),
        ({"lr": torch.tensor([0.1, 0.2])}, "Tensor lr must be 1-element"),
        ({"backend": "tvm"}, "Invalid backend: 'tvm'. Choose one of 'auto', 'inductor', 'torchair', 'eager'"),
    ],
)
def test_value_errors_match_torch(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        NpuFusedRMSprop(make_params(), **kwargs)
    if "backend" not in kwargs:
        with pytest.raises(ValueError, match=re.escape(message)):
            torch.optim.RMSprop(make_params(), **kwargs)


@pytest.mark.parametrize("error_input", optim_error_inputs_func_rmsprop("cpu", torch.float32), ids=lambda e: e.optimizer_error_input.desc)
def test_torch_error_inputs(error_input):
    inp = error_input.optimizer_error_input
    params = inp.params if inp.params is not None else make_params()
    if issubclass(error_input.error_type, Warning):
        with pytest.warns(error_input.error_type, match=error_input.error_regex):
            NpuFusedRMSprop(params, **inp.kwargs)
    else:
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            NpuFusedRMSprop(params, **inp.kwargs)


def test_sparse_grad_raises():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = NpuFusedRMSprop([p], backend="eager")
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_sparse_grad_after_dense_steps_raises():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = NpuFusedRMSprop([p], backend="eager")
    p.grad = torch.randn(4, 3)
    opt.step()
    p.grad = torch.randn(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()


def test_non_trainable_integer_param_is_accepted_as_torch_accepts_it():
    """torch.optim.RMSprop accepts an int64 tensor with requires_grad=False (it never
    gets a grad); so do we, and a step leaves it as it was."""
    w = torch.nn.Parameter(torch.randn(3))
    counter = torch.zeros(3, dtype=torch.int64)
    for make in (torch.optim.RMSprop, lambda ps: NpuFusedRMSprop(ps, backend="eager")):
        opt = make([w, counter])
        w.grad = torch.ones(3)
        opt.step()
        assert torch.equal(counter, torch.zeros(3, dtype=torch.int64))
        assert counter not in opt.state


def test_step_hooks_and_state_dict_hooks_run():
    po = make_params()
    opt = NpuFusedRMSprop(po, backend="eager")
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd_post") or sd)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre") or sd)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    set_grads(0, po)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_closure_returns_loss_with_grad_enabled():
    po = make_params()
    pr = clone_params(po)
    ours, ref = NpuFusedRMSprop(po, backend="eager"), torch.optim.RMSprop(pr)

    def closure_for(params, opt):
        def closure():
            opt.zero_grad()
            loss = sum((p.real**2).sum() if p.is_complex() else (p**2).sum() for p in params)
            loss.backward()
            return loss

        return closure

    for _ in range(5):
        lo = ours.step(closure_for(po, ours))
        lr_ = ref.step(closure_for(pr, ref))
        torch.testing.assert_close(lo, lr_)
    assert_same_state(ours, ref, po, pr, **TOL)


def test_add_param_group_after_steps():
    po, pr = make_params(), None
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po[:2], backend="inductor")
    ref = torch.optim.RMSprop(pr[:2])
    for step in range(10):
        if step == 4:
            ours.add_param_group({"params": po[2:], "lr": 0.05, "momentum": 0.3})
            ref.add_param_group({"params": pr[2:], "lr": 0.05, "momentum": 0.3})
        set_grads(step, po, pr)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po, pr, **TOL)


def test_printing_matches_torch():
    po = make_params()
    text = repr(NpuFusedRMSprop(po, lr=0.1))
    ref = repr(torch.optim.RMSprop(clone_params(po), lr=0.1))
    assert text == ref.replace("RMSprop (", "NpuFusedRMSprop (")


def test_deepcopy_trains_independently():
    po = make_params()
    opt = NpuFusedRMSprop(po, momentum=0.9, backend="eager")
    set_grads(0, po)
    opt.step()
    twin = copy.deepcopy(opt)
    twin_params = twin.param_groups[0]["params"]
    assert all(a is not b for a, b in zip(po, twin_params))
    set_grads(1, po, twin_params)
    opt.step()
    twin.step()
    assert_same_state(twin, opt, twin_params, po, rtol=0, atol=0)
    with torch.no_grad():
        twin_params[0].add_(1.0)
    assert not torch.equal(twin_params[0], po[0])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_semantics(set_to_none):
    po = make_params()
    pr = clone_params(po)
    ours, ref = NpuFusedRMSprop(po, backend="inductor"), torch.optim.RMSprop(pr)
    for step in range(6):
        ours.zero_grad(set_to_none=set_to_none)
        ref.zero_grad(set_to_none=set_to_none)
        for p, q in zip(po, pr):
            if set_to_none:
                assert p.grad is None and q.grad is None
            elif step > 0:
                assert torch.count_nonzero(p.grad) == 0
        for params in (po, pr):  # backward accumulates into existing grads
            loss = sum((p.real**3).sum() if p.is_complex() else (p**3).sum() for p in params)
            loss.backward()
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po, pr, **TOL)


SCHEDULERS = [
    lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20),
    lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10),
    lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
]


@pytest.mark.parametrize("make_scheduler", SCHEDULERS, ids=["step", "onecycle", "cosine", "plateau"])
def test_lr_schedulers_match_torch(make_scheduler):
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, momentum=0.9, backend="inductor")
    ref = torch.optim.RMSprop(pr, momentum=0.9)
    so, sr = make_scheduler(ours), make_scheduler(ref)
    for step in range(20):
        set_grads(step, po, pr)
        ours.step()
        ref.step()
        if isinstance(so, torch.optim.lr_scheduler.ReduceLROnPlateau):
            so.step(1.0)
            sr.step(1.0)
        else:
            so.step()
            sr.step()
        assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert_same_state(ours, ref, po, pr, **TOL)


def test_torchair_backend_without_torch_npu_says_what_is_missing():
    from npu_optim_compile._npu import npu_status

    if npu_status().torch_npu_version is not None:
        pytest.skip("torch_npu imports on this machine")
    with pytest.raises(RuntimeError, match="torch_npu is not installed|import torch_npu failed"):
        NpuFusedRMSprop(make_params(), backend="torchair")


def test_torchair_backend_without_an_npu_says_so(monkeypatch):
    """torch_npu and torchair import, but no NPU is visible: a clear error."""
    import npu_optim_compile.optimizer as optimizer_mod
    from npu_optim_compile._npu import NpuStatus

    monkeypatch.setattr(optimizer_mod, "require_torchair", lambda what: object())
    monkeypatch.setattr(optimizer_mod, "npu_status",
                        lambda: NpuStatus(False, "torch_npu imported but no NPU device is visible", "2.13.0"))
    with pytest.raises(RuntimeError, match="needs an Ascend NPU: torch_npu imported but no NPU device"):
        NpuFusedRMSprop(make_params(), backend="torchair")


def test_auto_backend_picks_by_device_type():
    from types import SimpleNamespace

    opt = NpuFusedRMSprop(make_params())
    assert opt._engine._resolve_backend(torch.device("cpu")) == "inductor"
    # torch.device("npu") itself needs torch_npu; only .type is read
    assert opt._engine._resolve_backend(SimpleNamespace(type="npu")) == "torchair"
    assert NpuFusedRMSprop(make_params(), backend="eager")._engine._resolve_backend(SimpleNamespace(type="npu")) == "eager"
