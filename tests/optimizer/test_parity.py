"""NpuFusedRMSprop against torch.optim.RMSprop, side by side, over 20 steps."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_inputs_func_rmsprop

from parity import SHAPES, TOLERANCES, assert_same_state, clone_params, make_params, run_side_by_side
from npu_optim_compile import NpuFusedRMSprop

TORCH_CONFIGS = optim_inputs_func_rmsprop("cpu")
CONFIG_IDS = [c.desc.replace(" ", "_") for c in TORCH_CONFIGS]


def ours(backend):
    return functools.partial(NpuFusedRMSprop, backend=backend)


@pytest.mark.parametrize(
    "backend, dtype",
    [("eager", torch.float32), ("inductor", torch.float32), ("eager", torch.float64)],
    ids=["eager_fp32", "inductor_fp32", "eager_fp64"],
)
@pytest.mark.parametrize("config", TORCH_CONFIGS, ids=CONFIG_IDS)
def test_torch_configs(config, backend, dtype):
    """fp64 (rtol 1e-12) catches what fp32's rtol 1e-6 cannot, e.g. lr off by 1e-6."""
    opt, ref, po, pr = run_side_by_side(ours(backend), config.kwargs, dtype=dtype)
    assert_same_state(opt, ref, po, pr, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.complex64])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"weight_decay": 0.1, "centered": True, "momentum": 0.1, "maximize": True}],
    ids=["default", "all_options"],
)
def test_dtypes(dtype, kwargs):
    opt, ref, po, pr = run_side_by_side(ours("inductor"), kwargs, dtype=dtype)
    assert_same_state(opt, ref, po, pr, **TOLERANCES[dtype])


def test_mixed_dtypes_in_one_group():
    """fp32, fp16, bf16 and fp64 params in one group: one bucket each, all exact."""
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float32]
    params = [torch.nn.Parameter(torch.randn(5, 3).to(d)) for d in dtypes]
    opt, ref, po, pr = run_side_by_side(ours("inductor"), {"momentum": 0.5}, params=(params, None))
    for d in set(dtypes):
        idx = [i for i, x in enumerate(dtypes) if x == d]
        assert_same_state(opt, ref, [po[i] for i in idx], [pr[i] for i in idx], **TOLERANCES[d])
    assert len(opt.describe_buckets()) == 4


@pytest.mark.parametrize("lr", [0.05, torch.tensor(0.05)], ids=["float", "tensor"])
def test_lr_float_and_tensor(lr):
    opt, ref, po, pr = run_side_by_side(ours("inductor"), {"lr": lr, "momentum": 0.3})
    assert_same_state(opt, ref, po, pr, **TOLERANCES[torch.float32])


def test_param_groups_with_different_options():
    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.03, "centered": True},
            {"params": ps[2:3], "momentum": 0.9, "weight_decay": 0.01},
            {"params": ps[3:], "alpha": 0.5, "maximize": True},
        ]

    opt, ref, po, pr = run_side_by_side(ours("inductor"), {"lr": 0.01}, groups=groups)
    assert_same_state(opt, ref, po, pr, **TOLERANCES[torch.float32])


def test_grad_none_is_skipped_and_untouched():
    """As in torch_npu's documented example: the last param never gets a grad."""
    last = len(SHAPES) - 1
    opt, ref, po, pr = run_side_by_side(
        ours("inductor"), {"momentum": 0.1}, skip=lambda step, i: i == last
    )
    assert opt.state.get(po[last], {}) == {}
    torch.testing.assert_close(po[last].detach(), make_params()[last].detach(), rtol=0, atol=0)
    assert_same_state(opt, ref, po, pr, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_grads_appear_late_and_come_and_go(backend):
    """Param 1 gets its first grad at step 5; param 2 has none on odd steps."""

    def skip(step, i):
        return (i == 1 and step < 5) or (i == 2 and step % 2 == 1)

    opt, ref, po, pr = run_side_by_side(ours(backend), {"centered": True, "momentum": 0.2}, skip=skip)
    assert float(opt.state[po[1]]["step"]) == 15
    assert float(opt.state[po[2]]["step"]) == 10
    assert_same_state(opt, ref, po, pr, **TOLERANCES[torch.float32])


def test_non_contiguous_params():
    """A transposed (channels-last-like) param and a non-dense view both follow torch."""
    base = torch.randn(6, 4)
    po = [torch.nn.Parameter(torch.randn(4, 6).t()), torch.nn.Parameter(base[:, ::2])]
    pr = clone_params(po)
    pr[0] = torch.nn.Parameter(po[0].detach().clone().t().contiguous().t())
    pr[1] = torch.nn.Parameter(base.clone()[:, ::2])
    opt, ref, po, pr = run_side_by_side(ours("inductor"), {}, params=(po, pr))
    assert po[0].stride() == (1, 6)
    assert_same_state(opt, ref, po, pr, **TOLERANCES[torch.float32])
