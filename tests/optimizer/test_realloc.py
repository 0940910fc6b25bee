"""Re-allocated params and grads: detected, gathered again, never silently dropped."""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop

TOL = TOLERANCES[torch.float32]


def run(po, pr, ours, ref, steps, start=0):
    for step in range(start, start + steps):
        set_grads(step, po, pr)
        ours.step()
        ref.step()


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_param_data_replaced(backend):
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, momentum=0.5, backend=backend)
    ref = torch.optim.RMSprop(pr, momentum=0.5)
    run(po, pr, ours, ref, 5)
    new = torch.randn(po[0].shape)
    po[0].data = new.clone()  # e.g. a weight re-initialised in place of the old tensor
    pr[0].data = new.clone()
    run(po, pr, ours, ref, 5, start=5)
    assert_same_state(ours, ref, po, pr, **TOL)
    assert ours._engine.layouts()[0].buckets[0].owns(po[0])  # gathered back into the flat buffer


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


def test_param_leaving_the_bucket_gets_its_own_storage():
    """A param without a grad at the next step is released from the flat buffers:
    modifying it afterwards must not touch other params, and its values are kept."""
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    ours.step()
    kept = po[1].detach().clone()
    set_grads(1, po, skip=lambda step, i: i == 1)
    ours.step()
    old_buffers = ours._engine.layouts()[0].buckets
    assert not any(b.owns(po[1]) for b in old_buffers)
    assert torch.equal(po[1].detach(), kept)
    others = [p.detach().clone() for p in po]
    with torch.no_grad():
        po[1].add_(100.0)
    for i, (p, before) in enumerate(zip(po, others)):
        if i != 1:
            assert torch.equal(p.detach(), before)


def test_zero_grad_keeping_grads_moves_them_into_the_flat_buffer():
    """step() leaves the user's grads where they are; zero_grad(set_to_none=False)
    points them at their slots (zeroing what they replace), and they stay there."""
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    before = [p.grad for p in po]
    ours.step()
    bucket = ours._engine.layouts()[0].buckets[0]
    assert all(p.grad is g for p, g in zip(po, before))
    assert not any(bucket.owns(p.grad) for p in po)
    ours.zero_grad(set_to_none=False)
    assert all(bucket.owns(p.grad) for p in po if p.numel())
    assert torch.count_nonzero(bucket.grad) == 0
    assert all(torch.count_nonzero(g) == 0 for g in before)  # as torch zeroes them
    slots = [p.grad for p in po]
    set_grads_in_place = [p.grad.add_(1.0) for p in po]
    del set_grads_in_place
    ours.step()
    ours.zero_grad(set_to_none=False)
    assert all(p.grad is s for p, s in zip(po, slots))


def test_params_sharing_storage_stay_tied():
    """Two params on one storage (or a param a kept tensor aliases) are not re-pointed."""
    base = torch.randn(6)
    a = torch.nn.Parameter(base.clone())
    b = torch.nn.Parameter(a.data)  # same storage
    kept = torch.randn(4)
    c = torch.nn.Parameter(kept)  # `kept` still aliases it
    d = torch.nn.Parameter(torch.randn(3))  # owns its storage: flattened
    opt = NpuFusedRMSprop([a, b, c, d], backend="eager")
    for step in range(3):
        for p in (a, b, c, d):
            p.grad = torch.ones_like(p)
        opt.step()
    assert a.data_ptr() == b.data_ptr()
    assert c.data_ptr() == kept.data_ptr()
    (bucket,) = opt._engine.layouts()[0].buckets
    assert bucket.params == [d]


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
