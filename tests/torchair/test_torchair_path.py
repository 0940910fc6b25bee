"""A fast pre-check of the torchair path without torchair: the GE converter coverage
(passes/ge_allowlist.json) of every bucket-step graph our pass emits, for all option
combinations. The reference is torchair's real conversion: test_dry_run_ge.py."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from npu_optim_compile._bucket_step import FLAGS, StepKey, _make_python_step, segments_like
from npu_optim_compile._hyper import HYPER_LAYOUT
from npu_optim_compile.passes import fuse_foreach_ops
from npu_optim_compile.passes.ge_ops import unsupported_ops


def trace_bucket_step(flags: frozenset, dtype=torch.float32) -> torch.fx.GraphModule:
    """The functional aten graph of a bucket step, as AOT autograd hands it to torchair's
    post-grad pass (functionalized mutations, views kept), traced with fake tensors."""
    fn = _make_python_step(StepKey("torchair", "cpu", dtype, flags))
    args = [torch.randn(8, dtype=dtype) for _ in range(5)]
    args += [torch.rand(len(HYPER_LAYOUT), dtype=torch.float32), torch.tensor(0.0)]
    args += list(segments_like(args[0], [5, 3], "caution" in flags))
    return make_fx(torch.func.functionalize(fn, remove="mutations"), tracing_mode="fake")(*args)


#: The flags that add ops, crossed exhaustively; the rest all on or all off.
_CORE = ("centered", "momentum", "weight_decay", "maximize", "eps_in_sqrt", "bias_correction", "found_inf")
_REST = tuple(sorted(FLAGS - set(_CORE)))


def _combinations():
    for core in itertools.product((False, True), repeat=len(_CORE)):
        on = {f for f, v in zip(_CORE, core) if v}
        for rest in (set(), set(_REST)):
            flags = on | rest
            if "nesterov" in flags and "momentum" not in flags:
                flags.discard("nesterov")
            if "lr_unscaled_decay" in flags:  # corrected decay needs the lr-scaled one
                flags.discard("corrected_weight_decay")
            yield frozenset(flags)


def test_ge_coverage_of_every_option_combination():
    """Every op our pass leaves, for every option combination the optimizer can produce
    (256 structures), has a working GE converter in torch_npu 2.13.0's torchair; and the
    graphs before the pass do not (so the check can fail)."""
    missing, before_missing = {}, set()
    combos = sorted(set(_combinations()), key=sorted)
    assert len(combos) >= 200
    for flags in combos:
        gm = trace_bucket_step(flags)
        before_missing.update(unsupported_ops(gm.graph))
        fuse_foreach_ops(gm.graph)
        gm.graph.lint()
        bad = unsupported_ops(gm.graph)
        if bad:
            missing[",".join(sorted(flags))] = bad
    assert missing == {}
    assert "aten._foreach_sqrt.default" in before_missing


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ge_coverage_low_precision(dtype):
    gm = trace_bucket_step(frozenset(FLAGS - {"lr_unscaled_decay"}), dtype)
    fuse_foreach_ops(gm.graph)
    assert unsupported_ops(gm.graph) == []
