"""Nothing silently wrong: swapped storages, grads of another shape, checkpoints that do
not fit, steps that fail, duplicated params; each case beside torch.optim.RMSprop."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile._dump import DUMP_ENV

TOL = TOLERANCES[torch.float32]
KW = dict(momentum=0.5, centered=True)


def kept_grads_training(model, opt, x, swap=None, steps=12):
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        if swap is not None and step == 4:
            swap(model, opt)
        opt.step()


def make_pair(seed=0):
    # float64: a real model trained 12 steps amplifies fp32 rounding (1 ulp per op
    # between torch's for-loop and the fused step) past any tolerance worth having.
    torch.manual_seed(seed)
    mo = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).double()
    mr = copy.deepcopy(mo)
    return mo, mr


SWAPS = {
    "grad.data": lambda m, o: setattr(m[0].weight.grad, "data", m[0].weight.grad.detach().clone() * 3),
    "grad.set_": lambda m, o: m[0].weight.grad.set_(m[0].weight.grad.detach().clone() * 3),
    "state.data": lambda m, o: setattr(
        o.state[m[0].weight]["square_avg"], "data", o.state[m[0].weight]["square_avg"].clone() + 1.0
    ),
    "state.set_": lambda m, o: o.state[m[2].bias]["momentum_buffer"].set_(
        o.state[m[2].bias]["momentum_buffer"].clone() - 2.0
    ),
}


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("swap", sorted(SWAPS))
def test_storage_swapped_in_place_is_seen(swap, backend):
    """p.grad.data = t, p.grad.set_(t) (Horovod's pattern), state[...].data = t: the same
    Python object with another storage. With grads kept in our flat buffer, each is read
    at the next step, as torch reads it."""
    mo, mr = make_pair()
    ours = NpuFusedRMSprop(mo.parameters(), backend=backend, **KW)
    ref = torch.optim.RMSprop(mr.parameters(), **KW)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kept_grads_training(mo, ours, x, SWAPS[swap])
    kept_grads_training(mr, ref, x, SWAPS[swap])
    tol = TOLERANCES[torch.float64]
    assert_same_state(ours, ref, list(mo.parameters()), list(mr.parameters()), **tol)
    # and state_dict() saves the live values, not a dead buffer
    sd = ours.state_dict()["state"]
    for i, p in enumerate(mo.parameters()):
        torch.testing.assert_close(sd[i]["square_avg"], ref.state[list(mr.parameters())[i]]["square_avg"], **tol)


@pytest.mark.parametrize("shape", [(4,), (2, 3)], ids=["broadcastable", "not_broadcastable"])
def test_grad_of_another_shape_raises(shape):
    """Only reachable through .data: torch raises where it cannot broadcast, and trains
    on a broadcast grad otherwise; we raise in both cases, naming the shapes."""
    po = [torch.nn.Parameter(torch.randn(3, 4))]
    ours = NpuFusedRMSprop(po, backend="eager")
    po[0].grad = torch.randn(3, 4)
    ours.step()
    ours.zero_grad(set_to_none=False)
    before = po[0].detach().clone()
    po[0].grad.data = torch.randn(shape)
    with pytest.raises(RuntimeError, match=r"grad of shape \(.*\) for a parameter of shape \(3, 4\)"):
        ours.step()
    assert torch.equal(po[0].detach(), before)
    if shape == (2, 3):
        pr = [torch.nn.Parameter(torch.randn(3, 4))]
        ref = torch.optim.RMSprop(pr)
        pr[0].grad = torch.randn(3, 4)
        ref.step()
        pr[0].grad.data = torch.randn(shape)
        with pytest.raises(RuntimeError):
            ref.step()


def _trained(opt_factory, steps=3, **kw):
    po = make_params()
    opt = opt_factory(po, **kw)
    for step in range(steps):
        set_grads(step, po)
        opt.step()
    return po, opt


def _corrupt(kind: str, sd: dict) -> dict:
    sd = copy.deepcopy(sd)
    if kind == "no_momentum_buffer":
        del sd["state"][0]["momentum_buffer"]
    elif kind == "no_step":
        del sd["state"][1]["step"]
    elif kind == "wrong_shape":
        sd["state"][0]["square_avg"] = torch.zeros(1, 3)  # param 0 is (4, 3)
    return sd


@pytest.mark.parametrize("kind", ["adam", "no_momentum_buffer", "no_step", "wrong_shape"])
def test_checkpoint_that_does_not_fit_fails_loudly(kind):
    """torch.optim.RMSprop raises at load or at the next step; we raise at load, naming
    the param and the key, and keep our state as it was."""
    if kind == "adam":
        _, adam = _trained(torch.optim.Adam)
        sd = adam.state_dict()
        sd["param_groups"][0].update(momentum=0.5, alpha=0.99, centered=False)
        expected = r"param group 0, parameter 0 .* has no 'square_avg'"
    else:
        _, donor = _trained(lambda ps, **k: NpuFusedRMSprop(ps, backend="eager", **k), momentum=0.5)
        sd = _corrupt(kind, donor.state_dict())
        expected = {
            "no_momentum_buffer": r"parameter 0 .* has no 'momentum_buffer'",
            "no_step": r"parameter 1 .* has no 'step'",
            "wrong_shape": r"'square_avg' of param group 0, parameter 0 .* has shape \(1, 3\), the parameter \(4, 3\)",
        }[kind]
    po, ours = _trained(lambda ps, **k: NpuFusedRMSprop(ps, backend="eager", **k), momentum=0.5)
    before = {i: {k: v.clone() for k, v in ours.state[p].items()} for i, p in enumerate(po)}
    with pytest.raises(ValueError, match=expected):
        ours.load_state_dict(sd)
    for i, p in enumerate(po):
        for k, v in before[i].items():
            assert torch.equal(ours.state[p][k], v)
    # torch.optim.RMSprop fails too, at the load or at the next step
    pr, ref = _trained(torch.optim.RMSprop, momentum=0.5)
    with pytest.raises((RuntimeError, KeyError, ValueError)):
        ref.load_state_dict(sd)
        set_grads(9, pr)
        ref.step()


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_unwritable_dump_dir_fails_at_construction_naming_it(source, monkeypatch):
    po = make_params()
    if source == "argument":
        with pytest.raises(ValueError, match=r"dump_dir='/proc/x' is not a writable folder"):
            NpuFusedRMSprop(po, dump_dir="/proc/x")
    else:
        monkeypatch.setenv(DUMP_ENV, "/proc/x")
        with pytest.raises(ValueError, match=rf"{DUMP_ENV}='/proc/x' is not a writable folder"):
            NpuFusedRMSprop(po)


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], {
        i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)
    }


def _assert_snapshot(opt, params, snap):
    values, state = snap
    for i, (p, v) in enumerate(zip(params, values)):
        assert torch.equal(p.detach(), v), i
        for k, t in state[i].items():
            assert torch.equal(opt.state[p][k], t), (i, k)


def _forget_compiled_steps(opt) -> None:
    for plan in opt._engine.plans().values():
        for bucket in plan.buckets:
            bucket.cache.pop("compiled", None)


@pytest.mark.parametrize("where", ["compile", "call"])
def test_a_step_that_raises_changes_nothing(where, monkeypatch):
    """Fault injection in the middle of training: the compiled step of the second bucket
    (float64) fails to compile, or the first bucket's step raises when called. Params,
    state and step counts stay as they were (the first bucket, whose step compiles,
    is not run either: every step is compiled before any is run), and the next step
    gives torch's result."""
    from npu_optim_compile import _bucket_step, _engine

    po = make_params(shapes=[(4, 3), (7,)]) + [torch.nn.Parameter(torch.randn(5, dtype=torch.float64))]
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **KW)
    ref = torch.optim.RMSprop(pr, **KW)
    for step in range(3):
        set_grads(step, po, pr)
        ours.step()
        ref.step()
    set_grads(3, po, pr)
    snap = _snapshot(ours, po)

    def boom(*args, **kwargs):
        raise RuntimeError("injected failure")

    real_build = _bucket_step._build
    _bucket_step.clear_cache()
    _forget_compiled_steps(ours)
    if where == "compile":
        monkeypatch.setattr(
            _bucket_step, "_build", lambda key, *a: boom if key.dtype == torch.float64 else real_build(key, *a)
        )
    else:
        real_run = _engine.run_segments

        def run_first_fails(bucket, *args):
            return boom() if bucket.dtype == torch.float32 else real_run(bucket, *args)

        monkeypatch.setattr(_engine, "run_segments", run_first_fails)
    with pytest.raises(RuntimeError, match="injected failure"):
        ours.step()
    _assert_snapshot(ours, po, snap)
    monkeypatch.undo()
    _bucket_step.clear_cache()
    _forget_compiled_steps(ours)
    ours.step()
    ref.step()
    assert_same_state(ours, ref, po, pr, **TOL)


def test_param_listed_twice_is_updated_twice_as_torch_does():
    po = make_params(shapes=[(4, 3), (7,)])
    pr = clone_params(po)
    with warnings.catch_warnings(record=True) as w_ours:
        warnings.simplefilter("always")
        ours = NpuFusedRMSprop([po[0], po[1], po[0]], backend="eager", **KW)
    with warnings.catch_warnings(record=True) as w_ref:
        warnings.simplefilter("always")
        ref = torch.optim.RMSprop([pr[0], pr[1], pr[0]], **KW)
    assert [str(w.message) for w in w_ours] == [str(w.message) for w in w_ref]
    for step in range(5):
        set_grads(step, po, pr)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po, pr, **TOL)
