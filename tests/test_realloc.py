"""Re-allocated params and grads: detected, gathered again, never silently dropped."""

from __future__ import annotations

import pytest
import torch

from _util import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
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
    assert ours._layouts[0].buckets[0].owns(po[0])  # gathered back into the flat buffer


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
    old_buffers = ours._layouts[0].buckets
    assert not any(b.owns(po[1]) for b in old_buffers)
    assert torch.equal(po[1].detach(), kept)
    others = [p.detach().clone() for p in po]
    with torch.no_grad():
        po[1].add_(100.0)
    for i, (p, before) in enumerate(zip(po, others)):
        if i != 1:
            assert torch.equal(p.detach(), before)


def test_grads_kept_between_steps_stay_in_the_flat_buffer():
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    ours.step()
    bucket = ours._layouts[0].buckets[0]
    assert all(bucket.owns(p.grad) for p in po if p.numel())
    ours.zero_grad(set_to_none=False)
    assert all(bucket.owns(p.grad) for p in po if p.numel())
    assert torch.count_nonzero(bucket.grad) == 0
