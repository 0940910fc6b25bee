"""Storage another engine owns is never re-pointed (one process, no torch.distributed)."""

from __future__ import annotations

import torch

from parity import TOLERANCES, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile._ownership import is_foreign

KWARGS = dict(momentum=0.5, centered=True)


def test_is_foreign():
    alone = torch.nn.Parameter(torch.randn(3, 2))
    assert not is_foreign(alone)
    bucket = torch.zeros(10)
    assert is_foreign(bucket[2:8].view(3, 2))  # a view into a larger storage
    assert is_foreign(bucket.view(2, 5))  # all of a storage that `bucket` shares
    opt = NpuFusedRMSprop([alone], backend="eager")
    alone.grad = torch.randn(3, 2)
    opt.step()
    flat = opt._engine.layouts()[0].buckets[0].param
    assert alone.data_ptr() == flat.data_ptr()  # now a view of our flat buffer, which
    # shares its storage: known as ours, so not foreign
    assert not is_foreign(alone) and not is_foreign(alone.grad)


def as_views_of_one_bucket(params):
    """What ZeroRedundancyOptimizer(parameters_as_bucket_view=True) does to its params."""
    bucket = torch.empty(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        bucket[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
        p.data = bucket[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return bucket


def test_params_in_a_foreign_bucket_stay_there():
    po = make_params(shapes=[(4, 3), (7,), (2, 3, 2)])
    pr = clone_params(po)
    bucket = as_views_of_one_bucket(po)
    opt = NpuFusedRMSprop(po, backend="eager", **KWARGS)
    ref = torch.optim.RMSprop(pr, **KWARGS)
    for step in range(5):
        set_grads(step, po, pr)
        opt.step()
        ref.step()
    layout = opt._engine.layouts()[0]
    assert layout.buckets == [] and len(layout.loose) == 3
    # The owner's bucket holds the updated values (ZeRO broadcasts exactly this tensor).
    expected = torch.cat([q.detach().reshape(-1) for q in pr])
    torch.testing.assert_close(bucket, expected, **TOLERANCES[torch.float32])


def test_grads_in_a_foreign_bucket_are_copied_not_repointed():
    """As DDP(gradient_as_bucket_view=True): each backward writes the grads into the
    owner's bucket; we copy them in, and p.grad stays the owner's view."""
    po = make_params(shapes=[(4, 3), (7,), (2, 3, 2)])
    pr = clone_params(po)
    grad_bucket = torch.zeros(sum(p.numel() for p in po))
    views, offset = [], 0
    for p in po:
        views.append(grad_bucket[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    opt = NpuFusedRMSprop(po, backend="eager", **KWARGS)
    ref = torch.optim.RMSprop(pr, **KWARGS)
    for step in range(5):
        set_grads(step, pr)
        for p, q, view in zip(po, pr, views):
            view.copy_(q.grad)  # the owner writes into its bucket in place
            p.grad = view
        opt.step()
        ref.step()
        opt.zero_grad(set_to_none=False)  # zeroes the owner's views in place, keeps them
        assert all(p.grad is view for p, view in zip(po, views))
        assert torch.count_nonzero(grad_bucket) == 0
    assert len(opt._engine.layouts()[0].buckets) == 1
    for p, q in zip(po, pr):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
