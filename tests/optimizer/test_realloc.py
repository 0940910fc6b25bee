"""Re-allocated params and grads: read where they now are, never silently dropped.

By default params, grads and state stay the user's tensors: a param whose data is
replaced is updated at its new address. With ``combine_params=True`` a param that moves
out of its flat buffer stays where the user put it (it is never gathered back).
"""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop

TOL = TOLERANCES[torch.float32]
MODES = pytest.mark.parametrize("combine", [False, True], ids=["separate", "combined"])


def run(po, pr, ours, ref, steps, start=0):
    for step in range(start, start + steps):
        set_grads(step, po, pr)
        ours.step()
        ref.step()


@MODES
@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_param_data_replaced(backend, combine):
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, momentum=0.5, backend=backend, combine_params=combine)
    ref = torch.optim.RMSprop(pr, momentum=0.5)
    run(po, pr, ours, ref, 5)
    new = torch.randn(po[0].shape)
    po[0].data = new.clone()  # e.g. a weight re-initialised in place of the old tensor
    pr[0].data = new.clone()
    where = po[0].data_ptr()
    run(po, pr, ours, ref, 5, start=5)
    assert_same_state(ours, ref, po, pr, **TOL)
    assert po[0].data_ptr() == where  # updated where the user put it


def test_model_to_channels_last():
    """model.to(memory_format=...) re-allocates conv weights with new strides."""
    torch.manual_seed(0)
    mo = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    mr = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 1))
    mr.load_state_dict(mo.state_dict())
    ours = NpuFusedRMSprop(mo.parameters(), momentum=0.5, centered=True, backend="inductor")
    ref = torch.optim.RMSprop(mr.parameters(), momentum=0.5, centered=True)
    x = torch.randn(2, 3, 8, 8)
    for step in range(10):
        if step == 4:
            mo.to(memory_format=torch.channels_last)
            mr.to(memory_format=torch.channels_last)
        for m, opt in ((mo, ours), (mr, ref)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    assert mo[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_state(ours, ref, list(mo.parameters()), list(mr.parameters()), **TOL)


@MODES
def test_param_without_a_grad_keeps_its_values_and_storage(combine):
    """A param without a grad at the next step is not updated: modifying it afterwards
    must not touch other params, its values are kept, and when its grad comes back it
    is updated where it is."""
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="eager", combine_params=combine)
    ref = torch.optim.RMSprop(pr)
    set_grads(0, po, pr)
    ours.step()
    ref.step()
    kept, where = po[1].detach().clone(), po[1].data_ptr()
    set_grads(1, po, pr, skip=lambda step, i: i == 1)
    ours.step()
    ref.step()
    assert torch.equal(po[1].detach(), kept) and po[1].data_ptr() == where
    others = [p.detach().clone() for p in po]
    with torch.no_grad():
        po[1].add_(100.0)
        pr[1].add_(100.0)
    for i, (p, before) in enumerate(zip(po, others)):
        if i != 1:
            assert torch.equal(p.detach(), before)
    run(po, pr, ours, ref, 3, start=2)
    assert_same_state(ours, ref, po, pr, **TOL)
    assert po[1].data_ptr() == where


def test_zero_grad_keeping_grads_moves_combined_grads_into_the_flat_buffer():
    """step() leaves the user's grads where they are; with combined params,
    zero_grad(set_to_none=False) points them at their slots (zeroing what they
    replace), and they stay there."""
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager", combine_params=True)
    set_grads(0, po)
    before = [p.grad for p in po]
    ours.step()
    (chunk,) = ours._engine.combiner.chunks
    lo, hi = chunk.grad.data_ptr(), chunk.grad.data_ptr() + chunk.grad.numel() * 4

    def owned(t):
        return lo <= t.data_ptr() < hi

    assert all(p.grad is g for p, g in zip(po, before))
    assert not any(owned(p.grad) for p in po)
    ours.zero_grad(set_to_none=False)
    assert all(owned(p.grad) for p in po)
    assert torch.count_nonzero(chunk.grad) == 0
    assert all(torch.count_nonzero(g) == 0 for g in before)  # as torch zeroes them
    slots = [p.grad for p in po]
    for p in po:
        p.grad.add_(1.0)
    ours.step()
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is s for p, s in zip(po, slots))


@MODES
def test_params_sharing_storage_stay_tied(combine):
    """Two params on one storage (or a param a kept tensor aliases) are never re-pointed:
    tied ones are updated one after the other, as torch updates them."""
    base = torch.randn(6)
    kept = torch.randn(4)
    made = {}
    for name in ("ours", "ref"):
        a = torch.nn.Parameter(base.clone())
        b = torch.nn.Parameter(a.data)  # same storage
        c = torch.nn.Parameter(kept if name == "ours" else kept.clone())  # `kept` still aliases it
        d = torch.nn.Parameter(torch.arange(3.0))  # owns its storage: combined
        made[name] = [a, b, c, d]
    po, pr = made["ours"], made["ref"]
    opt = NpuFusedRMSprop(po, backend="eager", weight_decay=0.1, combine_params=combine)
    ref = torch.optim.RMSprop(pr, weight_decay=0.1)
    for step in range(3):
        set_grads(step, po, pr)
        opt.step()
        ref.step()
    a, b, c, d = po
    assert a.data_ptr() == b.data_ptr()
    assert c.data_ptr() == kept.data_ptr()
    assert_same_state(opt, ref, po, pr, **TOL)
    if combine:
        (chunk,) = opt._engine.combiner.chunks
        assert chunk.params == [d]


def test_step_bumps_autograd_versions():
    """A graph that saved a param before the step fails on backward, as with torch."""
    for make in (lambda p: NpuFusedRMSprop(p, backend="eager"), torch.optim.RMSprop):
        w = torch.nn.Parameter(torch.randn(3))
        opt = make([w])
        w.grad = torch.ones(3)
        opt.step()
        loss = (w * w).sum()  # saves w
        w.grad = torch.ones(3)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_grad_of_another_dtype_is_handled():
    """torch 2.13's grad_dtype: fp32 grads for bf16 params."""
    po = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16)) for _ in range(2)]
    pr = clone_params(po)
    for p in po + pr:
        p.grad_dtype = torch.float32
    ours = NpuFusedRMSprop(po, backend="eager")
    ref = torch.optim.RMSprop(pr)
    for step in range(3):
        for p, q in zip(po, pr):
            g = torch.randn(4, generator=torch.Generator().manual_seed(step))
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(po, pr):
        torch.testing.assert_close(p, q, **TOLERANCES[torch.bfloat16])


def test_param_data_replaced_while_grads_are_kept():
    """The fast path: grads stay in our buffer (set_to_none=False, backward accumulates
    into them), and p.data is replaced between steps."""
    torch.manual_seed(0)
    mo = torch.nn.Linear(4, 3)
    mr = torch.nn.Linear(4, 3)
    mr.load_state_dict(mo.state_dict())
    ours = NpuFusedRMSprop(mo.parameters(), momentum=0.5, backend="eager")
    ref = torch.optim.RMSprop(mr.parameters(), momentum=0.5)
    x = torch.randn(8, 4)
    for step in range(6):
        if step == 3:
            new = torch.randn(3, 4)
            mo.weight.data = new.clone()
            mr.weight.data = new.clone()
        for m, opt in ((mo, ours), (mr, ref)):
            opt.zero_grad(set_to_none=False)
            m(x).square().sum().backward()
            opt.step()
    assert_same_state(ours, ref, list(mo.parameters()), list(mr.parameters()), **TOL)
