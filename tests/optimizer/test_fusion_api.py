"""torch_npu's tensor-fusion API: combined params/grads, fused grad-norm clipping."""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_close_at_scale, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop


def test_combined_params_and_grads_are_the_flat_buffers():
    po = make_params() + [torch.nn.Parameter(torch.randn(3, dtype=torch.float64))]
    opt = NpuFusedRMSprop(po, combine_params=True)
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
    opt = NpuFusedRMSprop(po, combine_params=True)
    set_grads(0, po)
    opt.step()
    opt.zero_grad()  # set_to_none=True: autograd allocates new grads
    set_grads(1, po)
    expected = [p.grad.clone() for p in po]
    flat = opt.get_combined_grads()[0]
    # the params were combined in group order
    torch.testing.assert_close(flat, torch.cat([g.reshape(-1) for g in expected]))
    lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for p, g in zip(po, expected):  # and each p.grad now is its slot, with its values
        assert lo <= p.grad.data_ptr() < hi
        torch.testing.assert_close(p.grad, g)


def test_fusion_api_needs_combined_params():
    opt = NpuFusedRMSprop(make_params())
    with pytest.raises(RuntimeError, match=r"get_combined_params\(\) needs params combined .*combine_params=True"):
        opt.get_combined_params()
    with pytest.raises(RuntimeError, match=r"get_combined_grads\(\) needs .*combine_params=True"):
        opt.get_combined_grads()


@pytest.mark.parametrize("combine", [False, True], ids=["separate", "combined"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no_clip"])
def test_clip_grad_norm_fused_matches_torch(norm_type, max_norm, combine):
    po = make_params() + [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="inductor", combine_params=combine)
    ref = torch.optim.RMSprop(pr)
    for step in range(5):
        set_grads(step, po, pr)
        total_ours = ours.clip_grad_norm_fused_(max_norm, norm_type)
        total_ref = torch.nn.utils.clip_grad_norm_(pr, max_norm, norm_type)
        # The total norm sums the fp32 params' norms (fp32 precision) and scales the
        # fp64 param's grad too: fp32's tolerance for all (measured 1.7e-7 relative).
        torch.testing.assert_close(total_ours, total_ref.to(total_ours.dtype), **TOLERANCES[torch.float32])
        for p, q in zip(po, pr):
            assert_close_at_scale(p.grad, q.grad, **TOLERANCES[torch.float32])
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po[:-1], pr[:-1], **TOLERANCES[torch.float32])
