"""Storage another engine owns is never re-pointed (one process, no torch.distributed).

By default nothing is ever re-pointed; with ``combine_params=True`` params are moved into
flat buffers, except those whose storage someone else holds (``_ownership.is_foreign``).
"""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile._ownership import is_foreign

KWARGS = dict(momentum=0.5, centered=True)
MODES = pytest.mark.parametrize("combine", [False, True], ids=["separate", "combined"])


def test_is_foreign():
    alone = torch.nn.Parameter(torch.randn(3, 2))
    assert not is_foreign(alone)
    bucket = torch.zeros(10)
    assert is_foreign(bucket[2:8].view(3, 2))  # a view into a larger storage
    assert is_foreign(bucket.view(2, 5))  # all of a storage that `bucket` shares
    opt = NpuFusedRMSprop([alone], backend="eager", combine_params=True)
    alone.grad = torch.randn(3, 2)
    opt.step()
    flat = opt.get_combined_params()[0]
    assert alone.data_ptr() == flat.data_ptr()  # now a view of our flat buffer, in a
    # storage of its own: not foreign
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


@MODES
def test_params_in_a_foreign_bucket_stay_there(combine):
    po = make_params(shapes=[(4, 3), (7,), (2, 3, 2)])
    pr = clone_params(po)
    bucket = as_views_of_one_bucket(po)
    ptrs = [p.data_ptr() for p in po]
    opt = NpuFusedRMSprop(po, backend="eager", combine_params=combine, **KWARGS)
    ref = torch.optim.RMSprop(pr, **KWARGS)
    for step in range(5):
        set_grads(step, po, pr)
        opt.step()
        ref.step()
    assert [p.data_ptr() for p in po] == ptrs
    if combine:
        assert opt._engine.combiner.chunks == []
    # The owner's bucket holds the updated values (ZeRO broadcasts exactly this tensor).
    expected = torch.cat([q.detach().reshape(-1) for q in pr])
    torch.testing.assert_close(bucket, expected, **TOLERANCES[torch.float32])


@MODES
def test_grads_in_a_foreign_bucket_are_read_not_repointed(combine):
    """As DDP(gradient_as_bucket_view=True): each backward writes the grads into the
    owner's bucket; the step reads them there, and p.grad stays the owner's view."""
    po = make_params(shapes=[(4, 3), (7,), (2, 3, 2)])
    pr = clone_params(po)
    grad_bucket = torch.zeros(sum(p.numel() for p in po))
    views, offset = [], 0
    for p in po:
        views.append(grad_bucket[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    opt = NpuFusedRMSprop(po, backend="eager", combine_params=combine, **KWARGS)
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
    assert [b["tensors"] for b in opt.describe_buckets()] == [3]
    for p, q in zip(po, pr):
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])
