"""state_dict / load_state_dict in torch.optim.RMSprop's format, both ways."""

from __future__ import annotations

import io

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop

OPTIONS = {"momentum": 0.5, "centered": True, "weight_decay": 0.01}
TOL = TOLERANCES[torch.float32]


def roundtrip(obj):
    """What a checkpoint does: torch.save then torch.load (no aliasing of live tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        set_grads(step, params)
        opt.step()


@pytest.mark.parametrize("options", [{}, OPTIONS], ids=["default", "momentum_centered"])
def test_format_matches_torch(options):
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **options, backend="eager")
    ref = torch.optim.RMSprop(pr, **options)
    train(ours, po, 2)
    train(ref, pr, 2)
    so, sr = ours.state_dict(), ref.state_dict()
    assert so["param_groups"] == sr["param_groups"]
    assert so["state"].keys() == sr["state"].keys()
    for i in sr["state"]:
        assert so["state"][i].keys() == sr["state"][i].keys()
        for key, value in sr["state"][i].items():
            got = so["state"][i][key]
            assert isinstance(got, torch.Tensor)
            assert (got.shape, got.dtype, got.device) == (value.shape, value.dtype, value.device), key


@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_cross_load_and_continue(direction):
    """Train 7 steps with one, load into the other, continue 8: equals torch throughout."""
    po = make_params()
    pr = clone_params(po)
    first_cls, second_cls = (
        (torch.optim.RMSprop, NpuFusedRMSprop)
        if direction == "torch_to_ours"
        else (NpuFusedRMSprop, torch.optim.RMSprop)
    )
    first = first_cls(po, **OPTIONS)
    train(first, po, 7)
    saved = roundtrip(first.state_dict())

    cont_params = clone_params(po)
    second = second_cls(cont_params, **OPTIONS)
    second.load_state_dict(saved)
    train(second, cont_params, 8, start=7)

    ref = torch.optim.RMSprop(pr, **OPTIONS)  # the uninterrupted reference
    train(ref, pr, 15)
    assert_same_state(second, ref, cont_params, pr, **TOL)


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_checkpoint_resume_is_bitwise(backend):
    po = make_params()
    straight = NpuFusedRMSprop(po, **OPTIONS, backend=backend)
    train(straight, po, 20)

    pk = make_params()
    first = NpuFusedRMSprop(pk, **OPTIONS, backend=backend)
    train(first, pk, 9)
    ckpt = roundtrip({"params": [p.detach() for p in pk], "opt": first.state_dict()})

    resumed_params = [torch.nn.Parameter(t.clone()) for t in ckpt["params"]]
    resumed = NpuFusedRMSprop(resumed_params, **OPTIONS, backend=backend)
    resumed.load_state_dict(ckpt["opt"])
    train(resumed, resumed_params, 11, start=9)
    assert_same_state(resumed, straight, resumed_params, po, rtol=0, atol=0)


def test_load_after_first_step_takes_effect():
    """torch_npu's fused optimizers ignore a load after their first step; ours must not."""
    pa = make_params()
    a = NpuFusedRMSprop(pa, **OPTIONS, backend="eager")
    train(a, pa, 1)  # buckets exist now

    pb = clone_params(pa)
    b = torch.optim.RMSprop(pb, **OPTIONS)
    train(b, pb, 6, start=100)  # a different history
    a.load_state_dict(roundtrip(b.state_dict()))
    with torch.no_grad():
        for p, q in zip(pa, pb):
            p.copy_(q)
    train(a, pa, 3, start=200)
    train(b, pb, 3, start=200)
    assert_same_state(a, b, pa, pb, **TOL)


def test_loaded_state_is_aliased_as_torch_does():
    """torch's load_state_dict keeps the loaded tensors where their dtype and device fit
    (``Tensor.to`` returns them as they are): the next steps update them in place. So do
    we, by default; combined params copy them into their flat buffers."""
    results = {}
    for name, make in (("ours", lambda p: NpuFusedRMSprop(p, backend="eager")), ("torch", torch.optim.RMSprop),
                       ("combined", lambda p: NpuFusedRMSprop(p, backend="eager", combine_params=True))):
        po = make_params()
        opt = make(po)
        train(opt, po, 1)
        src = torch.optim.RMSprop(clone_params(po))
        train(src, src.param_groups[0]["params"], 2)
        sd = src.state_dict()
        opt.load_state_dict(sd)
        before = sd["state"][0]["square_avg"].clone()
        train(opt, po, 1, start=50)
        results[name] = torch.equal(sd["state"][0]["square_avg"], before)
    assert results == {"ours": False, "torch": False, "combined": True}


def test_loading_torch_format_keeps_this_optimizers_variant_options():
    """torch's state_dict has no variant keys; the loading optimizer keeps its own."""
    from npu_optim_compile import NpuFusedRMSpropTF

    pa = make_params()
    a = NpuFusedRMSpropTF(pa, momentum=0.5, decoupled_decay=True, weight_decay=0.1, backend="eager")
    train(a, pa, 4)
    saved = roundtrip(a.state_dict())
    for group in saved["param_groups"]:  # what a torch.optim.RMSprop checkpoint looks like
        for key in ("eps_in_sqrt", "initial_square_avg", "lr_in_momentum", "decoupled_weight_decay"):
            group.pop(key, None)
    pb = clone_params(pa)
    b = NpuFusedRMSpropTF(pb, momentum=0.5, decoupled_decay=True, weight_decay=0.1, backend="eager")
    b.load_state_dict(saved)
    assert b.param_groups[0]["eps_in_sqrt"] is True and b.param_groups[0]["lr_in_momentum"] is True
    train(a, pa, 3, start=4)
    train(b, pb, 3, start=4)
    assert_same_state(b, a, pb, pa, rtol=0, atol=0)


def test_state_changes_after_steps_take_effect():
    """Replacing, deleting or clearing state entries is seen, as with torch."""
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="eager")
    ref = torch.optim.RMSprop(pr, **OPTIONS)
    train(ours, po, 3)
    train(ref, pr, 3)
    for opt, params in ((ours, po), (ref, pr)):
        opt.state[params[0]]["momentum_buffer"] = torch.zeros_like(params[0])
        del opt.state[params[1]]
    train(ours, po, 2, start=3)
    train(ref, pr, 2, start=3)
    assert_same_state(ours, ref, po, pr, **TOL)
    ours.state.clear()
    ref.state.clear()
    train(ours, po, 2, start=5)
    train(ref, pr, 2, start=5)
    assert_same_state(ours, ref, po, pr, **TOL)


def test_state_dict_has_plain_dicts():
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    train(ours, po, 1)
    assert all(type(v) is dict for v in ours.state_dict()["state"].values())


def test_old_checkpoint_with_float_step_loads():
    """torch upgrades a float step from old checkpoints to a tensor; so do we (a
    non-contiguous param takes the per-tensor path, where the step is used as a tensor)."""
    p = torch.nn.Parameter(torch.randn(4, 6)[:, ::2])
    q = torch.nn.Parameter(p.detach().clone())
    ours, ref = NpuFusedRMSprop([p], backend="eager"), torch.optim.RMSprop([q])
    for opt, param in ((ours, p), (ref, q)):
        param.grad = torch.ones_like(param)
        opt.step()
        sd = opt.state_dict()
        sd["state"][0]["step"] = 1.0  # as saved by an old torch
        opt.load_state_dict(sd)
        param.grad = torch.ones_like(param)
        opt.step()
    assert float(ours.state[p]["step"]) == float(ref.state[q]["step"]) == 2.0
    torch.testing.assert_close(p, q)


def test_state_replaced_while_grads_are_kept():
    """The fast path (grads kept in our buffer) also sees a replaced state entry."""
    torch.manual_seed(0)
    mo, mr = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    mr.load_state_dict(mo.state_dict())
    ours = NpuFusedRMSprop(mo.parameters(), momentum=0.5, backend="eager")
    ref = torch.optim.RMSprop(mr.parameters(), momentum=0.5)
    x = torch.randn(8, 4)
    for step in range(6):
        for m, opt in ((mo, ours), (mr, ref)):
            if step == 3:
                opt.state[m.weight]["momentum_buffer"] = torch.zeros_like(m.weight)
            opt.zero_grad(set_to_none=False)
            m(x).square().sum().backward()
            opt.step()
    assert_same_state(ours, ref, list(mo.parameters()), list(mr.parameters()), **TOL)
