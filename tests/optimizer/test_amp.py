"""torch.amp.GradScaler with NpuFusedRMSprop: unscale and skip inside the step."""

from __future__ import annotations

import contextlib

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params
from npu_optim_compile import NpuFusedRMSprop

OPTIONS = dict(momentum=0.5, centered=True, weight_decay=0.01)
INF_STEP = 3


def scaled_backward(params, step, scale_fn):
    g = torch.Generator().manual_seed(500 + step)
    loss = sum((p.float() * torch.randn(p.shape, generator=g)).sum() for p in params)
    scale_fn(loss).backward()
    if step == INF_STEP:  # an overflow: the whole step must be skipped
        params[0].grad.view(-1)[0] = float("inf")


class LegacyContractScaler(torch.amp.GradScaler):
    """What torch_npu.npu.amp.GradScaler.step does (torch_npu 2.13.0,
    npu/amp/grad_scaler.py): for an optimizer with _step_supports_amp_scaling it calls
    optimizer.step(grad_scaler=self) and leaves unscaling and inf checks to it."""

    def step(self, optimizer, *args, **kwargs):
        if getattr(optimizer, "_step_supports_amp_scaling", False):
            retval = optimizer.step(*args, **dict(kwargs, grad_scaler=self))
            self._per_optimizer_states[id(optimizer)]["stage"] = type(
                self._per_optimizer_states[id(optimizer)]["stage"]
            ).STEPPED
            return retval
        return super().step(optimizer, *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unscale_first", [False, True], ids=["in_step", "user_unscale"])
def test_grad_scaler_matches_torch(dtype, unscale_first):
    po = make_params(dtype)
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="inductor")
    ref = torch.optim.RMSprop(pr, **OPTIONS)
    kw = dict(init_scale=2.0**8, growth_interval=2)
    so, sr = torch.amp.GradScaler("cpu", **kw), torch.amp.GradScaler("cpu", **kw)
    for step in range(10):
        for params, opt, scaler in ((po, ours, so), (pr, ref, sr)):
            opt.zero_grad()
            scaled_backward(params, step, scaler.scale)
            if unscale_first:  # e.g. to clip gradients before the step
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        assert so.get_scale() == sr.get_scale(), step
    assert float(ours.state[po[0]]["step"]) == 9  # one step skipped
    assert_same_state(ours, ref, po, pr, **TOLERANCES[dtype])


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, LegacyContractScaler], ids=["torch", "legacy"])
def test_fp16_against_grad_scaler_ops_by_hand(scaler_cls):
    """On the CPU, GradScaler refuses to unscale fp16 grads for torch.optim.RMSprop, so the
    reference applies GradScaler's own kernels by hand around a plain torch step."""
    po = make_params(torch.float16)
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="inductor")
    ref = torch.optim.RMSprop(pr, **OPTIONS)
    scaler = scaler_cls("cpu", init_scale=2.0**8, growth_interval=2)
    scale = torch.full((), 2.0**8)
    tracker = torch.zeros((), dtype=torch.int32)
    for step in range(10):
        ours.zero_grad()
        scaled_backward(po, step, scaler.scale)
        scaler.step(ours)
        scaler.update()

        ref.zero_grad()
        scaled_backward(pr, step, lambda loss: loss * scale)
        found_inf = torch.zeros(())
        torch._amp_foreach_non_finite_check_and_unscale_([p.grad for p in pr], found_inf, scale.double().reciprocal().float())
        if found_inf.item() == 0:
            ref.step()
        torch._amp_update_scale_(scale, tracker, found_inf, 2.0, 0.5, 2)
        assert scaler.get_scale() == scale.item(), step
        for a, b in zip(po, pr):  # the grads are left unscaled, as GradScaler's kernel leaves them
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    assert_same_state(ours, ref, po, pr, **TOLERANCES[torch.float16])


@contextlib.contextmanager
def forbid_host_sync():
    """Fail on any tensor-to-Python conversion (how a host synchronisation shows)."""
    names = ("item", "__bool__", "__float__", "__int__", "tolist")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(self, *args, **kwargs):
        raise AssertionError("host synchronisation inside the step")

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_scaler_step_has_no_host_sync():
    po = make_params()
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="inductor")
    scaler = torch.amp.GradScaler("cpu")
    for step in range(3):
        ours.zero_grad()
        scaled_backward(po, step, scaler.scale)
        with forbid_host_sync() if step > 0 else contextlib.nullcontext():
            scaler.step(ours)
        scaler.update()
    with pytest.raises(AssertionError, match="host synchronisation"), forbid_host_sync():
        torch.ones(1).item()  # the guard itself works


def test_legacy_grad_scaler_contract_matches_torch():
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="inductor")
    ref = torch.optim.RMSprop(pr, **OPTIONS)
    kw = dict(init_scale=2.0**8, growth_interval=2)
    so, sr = LegacyContractScaler("cpu", **kw), torch.amp.GradScaler("cpu", **kw)
    for step in range(8):
        for params, opt, scaler in ((po, ours, so), (pr, ref, sr)):
            opt.zero_grad()
            scaled_backward(params, step, scaler.scale)
            scaler.step(opt)
            scaler.update()
        assert so.get_scale() == sr.get_scale(), step
    assert not hasattr(ours, "found_inf")
    assert_same_state(ours, ref, po, pr, **TOLERANCES[torch.float32])


def test_torch_grad_scaler_uses_the_new_contract_without_warning():
    import warnings

    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    scaler = torch.amp.GradScaler("cpu")
    scaled_backward(po, 0, scaler.scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        scaler.step(ours)
    assert float(ours.state[po[0]]["step"]) == 1  # the step ran, through the new contract
    assert not hasattr(ours, "grad_scale")  # GradScaler removed what it set


def test_step_rejects_unknown_keywords():
    with pytest.raises(TypeError, match="unexpected keyword"):
        NpuFusedRMSprop(make_params()).step(foo=1)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


@pytest.mark.parametrize("scaler_cls", [torch.amp.GradScaler, LegacyContractScaler], ids=["torch", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loop", ["accumulate", "kept", "fresh"])
def test_grads_are_left_unscaled_as_torch_leaves_them(loop, dtype, scaler_cls):
    """After scaler.step, p.grad holds the unscaled gradient, as torch.optim.RMSprop's
    (GradScaler.unscale_ writes in place), skipped steps included. "accumulate" trains
    without zero_grad, so every later step reads what the earlier one left in .grad;
    "kept" zeroes with set_to_none=False (grads live in our flat buffer); "fresh" with
    the default set_to_none=True."""
    po = make_params(dtype)
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, **OPTIONS, backend="inductor")
    ref = torch.optim.RMSprop(pr, **OPTIONS)
    kw = dict(init_scale=2.0**7, growth_interval=3)
    so, sr = scaler_cls("cpu", **kw), torch.amp.GradScaler("cpu", **kw)
    for step in range(8):
        for params, opt, scaler in ((po, ours, so), (pr, ref, sr)):
            if loop != "accumulate":
                opt.zero_grad(set_to_none=loop == "fresh")
            scaled_backward(params, step, scaler.scale)
            scaler.step(opt)
            scaler.update()
        for i, (a, b) in enumerate(zip(_grads(po), _grads(pr))):
            torch.testing.assert_close(a, b, **TOLERANCES[dtype], equal_nan=True, msg=lambda m: f"step {step} grad {i}: {m}")
    assert_same_state(ours, ref, po, pr, **TOLERANCES[dtype])


def test_one_param_reproduction_from_the_issue():
    """True grad [1, 2, 3, 4], GradScaler(init_scale=128): torch leaves [1, 2, 3, 4] in
    p.grad after scaler.step, and three more steps without zero_grad agree."""
    results = []
    for make in (torch.optim.RMSprop, lambda ps: NpuFusedRMSprop(ps, backend="eager")):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = make([p])
        scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
        grads = []
        for _ in range(4):
            scaler.scale((p * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum()).backward()
            scaler.step(opt)
            scaler.update()
            grads.append(p.grad.clone())
        results.append((p.detach().clone(), grads))
    (p_ours, g_ours), (p_ref, g_ref) = results[1], results[0]
    assert torch.equal(g_ref[0], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(p_ours, p_ref)
