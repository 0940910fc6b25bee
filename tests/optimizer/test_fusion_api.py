"""torch_npu's tensor-fusion API: combined params/grads, fused grad-norm clipping."""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop


def test_combined_params_and_grads_are_the_flat_buffers():
    po = make_params() + [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    params, grads = opt.get_combined_params(), opt.get_combined_grads()
    assert [t.dtype for t in params] == [torch.float32, torch.float64]
    assert params[0].numel() == sum(p.numel() for p in po[:-1])
    with torch.no_grad():
        params[0].zero_()
        grads[1].fill_(7.0)
    assert all(torch.count_nonzero(p) == 0 for p in po[:-1])
    assert torch.equal(po[-1].grad, torch.full((3,), 7.0, dtype=torch.float64))


def test_combined_grads_follow_fresh_grads():
    po = make_params()
    opt = NpuFusedRMSprop(po, backend="eager")
    set_grads(0, po)
    opt.step()
    opt.zero_grad()  # set_to_none=True: autograd allocates new grads
    set_grads(1, po)
    expected = [p.grad.clone() for p in po]
    flat = opt.get_combined_grads()[0]
    # the flat buffer holds contiguous params of one shape together, not in group order
    bucket = opt._engine.layouts()[0].buckets[0]
    assert sorted(map(id, bucket.params)) == sorted(map(id, po))
    order = [next(i for i, p in enumerate(po) if p is q) for q in bucket.params]
    torch.testing.assert_close(flat, torch.cat([expected[i].reshape(-1) for i in order]))
    for p, g in zip(po, expected):  # and each p.grad now is its slot, with its values
        assert opt._engine.layouts()[0].buckets[0].owns(p.grad) or p.numel() == 0
        torch.testing.assert_close(p.grad, g)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no_clip"])
def test_clip_grad_norm_fused_matches_torch(norm_type, max_norm):
    po = make_params() + [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="inductor")
    ref = torch.optim.RMSprop(pr)
    for step in range(5):
        set_grads(step, po, pr)
        total_ours = ours.clip_grad_norm_fused_(max_norm, norm_type)
        total_ref = torch.nn.utils.clip_grad_norm_(pr, max_norm, norm_type)
        torch.testing.assert_close(total_ours, total_ref.to(total_ours.dtype), rtol=1e-6, atol=1e-6)
        for p, q in zip(po, pr):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po[:-1], pr[:-1], **TOLERANCES[torch.float32])
