"""The torchair path on the CPU: real Dynamo + AOT autograd with torchair's settings, a
stand-in for torchair's compiler that calls our pass with torchair's signature and runs
the resulting graph eagerly, and the GE converter coverage of every graph we emit.

What this cannot show: GE compiling and running the graph on an Ascend NPU.
"""

from __future__ import annotations

import copy
import itertools
import os
import types

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import npu_optim_compile._torchair_backend as torchair_mod
import npu_optim_compile.optimizer as optimizer_mod
from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile import _bucket_step as _compile
from npu_optim_compile._bucket_step import FLAGS, HYPER_LAYOUT, StepKey, _make_python_step, segments_like
from npu_optim_compile._npu import NpuStatus
from npu_optim_compile.passes import fuse_foreach_ops
from npu_optim_compile.passes.ge_ops import unsupported_ops


class FakeConfig(types.SimpleNamespace):
    pass


def make_fake_torchair(record: list):
    """A torchair stand-in with the API our code calls (CompilerConfig, get_npu_backend),
    whose backend does what torchair's _npu_backend does up to GE conversion:
    aot_module_simplified with keep_inference_input_mutations=True, then, in the compiler,
    post_grad_custom_pre_pass(copy of gm, example_inputs, config) in place."""
    from torch._functorch.aot_autograd import aot_module_simplified

    def CompilerConfig():  # noqa: N802 - mirrors torchair's class name
        return FakeConfig(mode="max-autotune", post_grad_custom_pre_pass=None,
                          debug=FakeConfig(graph_dump=FakeConfig(type=None, path=None)))

    def get_npu_backend(*, compiler_config=None, custom_decompositions={}):  # noqa: B006
        cfg = compiler_config

        def backend(gm, example_inputs, **kwargs):
            def compiler(aot_gm, aot_inputs):
                mutable = copy.deepcopy(aot_gm)
                if cfg.post_grad_custom_pre_pass is not None:
                    cfg.post_grad_custom_pre_pass(mutable, aot_inputs, cfg)
                record.append({"mode": cfg.mode, "dump": cfg.debug.graph_dump.path,
                               "unsupported": unsupported_ops(mutable.graph)})
                mutable.recompile()
                return mutable

            return aot_module_simplified(gm, example_inputs, fw_compiler=compiler,
                                         inference_compiler=compiler, keep_inference_input_mutations=True)

        return backend

    return types.SimpleNamespace(CompilerConfig=CompilerConfig, get_npu_backend=get_npu_backend)


@pytest.fixture
def fake_torchair(monkeypatch):
    record: list = []
    fake = make_fake_torchair(record)
    monkeypatch.setattr(torchair_mod, "require_torchair", lambda what: fake)
    monkeypatch.setattr(optimizer_mod, "require_torchair", lambda what: fake)
    monkeypatch.setattr(optimizer_mod, "npu_status", lambda: NpuStatus(True, "a fake NPU", "2.13.0"))
    _compile.clear_cache()
    yield record
    _compile.clear_cache()


@pytest.mark.parametrize("mode", ["max-autotune", "npugraph_ex"])
def test_torchair_backend_matches_torch(fake_torchair, mode):
    kwargs = dict(momentum=0.5, centered=True, weight_decay=0.1, maximize=True)
    po = make_params()
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="torchair", npu_mode=mode, **kwargs)
    ref = torch.optim.RMSprop(pr, **kwargs)
    for step in range(10):
        set_grads(step, po, pr)
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po, pr, **TOLERANCES[torch.float32])
    assert [r["mode"] for r in fake_torchair] == [mode]  # compiled once, in that mode
    assert fake_torchair[0]["unsupported"] == []


def test_torchair_dump_dir_reaches_torchair_config(fake_torchair, tmp_path):
    po = make_params()
    ours = NpuFusedRMSprop(po, backend="torchair", dump_dir=tmp_path)
    set_grads(0, po)
    ours.step()
    (folder,) = tmp_path.iterdir()
    assert fake_torchair[0]["dump"] == str(folder)
    names = {p.name for p in folder.iterdir()}
    assert {"dynamo_graph.py", "aten_before_fusion.py", "aten_after_fusion.py", "summary.json"} <= names
    assert "torch.ops.aten._foreach" in (folder / "aten_before_fusion.py").read_text()
    assert "torch.ops.aten._foreach" not in (folder / "aten_after_fusion.py").read_text()


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
