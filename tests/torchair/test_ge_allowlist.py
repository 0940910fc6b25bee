"""The GE allow-list: the committed list (passes/ge_ops.py), the graph check, and regeneration from the wheel (tools/ge_allowlist.py)."""

from __future__ import annotations

import json
import operator
import shutil
import subprocess
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ge_allowlist as gal
from npu_optim_compile import _torchair_source
from npu_optim_compile.passes import ge_ops

aten = torch.ops.aten

# Overloads a fusion pass emits, all with working GE converters in torch_npu 2.13.0
# (torchair/_ge_concrete_graph/ge_converter/aten/*.py, read from the wheel).
EXPECTED_WORKING = [
    "aten.mul.Tensor", "aten.mul.Scalar", "aten.add.Tensor", "aten.add.Scalar", "aten.sub.Tensor",
    "aten.div.Tensor", "aten.addcmul.default", "aten.addcdiv.default", "aten.sqrt.default",
    "aten.rsqrt.default", "aten.where.self", "aten.lerp.Scalar", "aten.copy_.default",
    "aten.cat.default", "aten.split_with_sizes.default", "aten.split.Tensor", "aten.view.default",
    "aten.reshape.default", "aten.as_strided.default", "aten.neg.default", "aten.clone.default",
    "aten._to_copy.default", "aten.full.default", "aten.zeros_like.default",
    "aten._foreach_add.List", "aten._foreach_add.Scalar", "aten._foreach_mul.List",
    "aten._foreach_mul.Scalar", "aten._foreach_addcmul.Scalar", "aten._foreach_addcdiv.Scalar",
    "aten._foreach_pow.Scalar", "aten._foreach_lerp.Scalar", "aten._foreach_div.List",
]  # fmt: skip
# Registered stubs that raise, and overloads with no converter at all.
EXPECTED_BROKEN = [
    "aten._foreach_sqrt.default", "aten._foreach_neg.default", "aten._foreach_reciprocal.default",
    "aten.sub.Scalar", "aten.lerp.Tensor", "aten.addcmul_.default", "aten.add_.Tensor",
    "aten._foreach_add_.List", "aten._foreach_mul_.Scalar", "aten.as_strided_.default",
    "aten.square.default", "aten.where.ScalarOther", "aten.copy_.Tensor", "aten.split.sizes",
    "aten.mul.out",
]  # fmt: skip
NO_CONVERTER = [
    "aten._foreach_mul.Tensor", "aten._foreach_add.Tensor", "aten._foreach_rsqrt.default",
    "aten._foreach_copy.default", "aten.split_with_sizes_copy.default", "aten.isfinite.default",
]  # fmt: skip


@pytest.fixture(scope="module")
def committed():
    return json.loads(ge_ops.ALLOWLIST_PATH.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", EXPECTED_WORKING)
def test_expected_ops_are_allowed(name):
    assert name in ge_ops.load_ge_allowlist()


@pytest.mark.parametrize("name", EXPECTED_BROKEN + NO_CONVERTER)
def test_broken_ops_are_not_allowed(name):
    assert name not in ge_ops.load_ge_allowlist()


def test_stubs_and_missing_are_told_apart(committed):
    assert set(EXPECTED_BROKEN) <= set(committed["stubs"])
    assert not set(NO_CONVERTER) & set(committed["stubs"])


def test_committed_file_is_consistent(committed):
    ops, stubs = committed["ops"], committed["stubs"]
    assert ops == sorted(ops) and stubs == sorted(stubs)
    assert not set(ops) & set(stubs)
    assert committed["counts"]["working"] == len(ops)
    assert committed["counts"]["registered"] == len(ops) + len(stubs)
    assert committed["torch_npu_version"] == gal.TORCH_NPU_VERSION
    assert committed["wheel"].startswith(f"torch_npu-{gal.TORCH_NPU_VERSION}-")
    assert len(committed["wheel_sha256"]) == 64
    # ge_converter/aten/*.py in the wheel registers 1787 converters (an AST count); one of
    # them is for torch.sym_sqrt, which is not an aten op.
    assert sum(s.startswith("aten.") for s in ops + stubs) == 1786


def test_every_allowed_name_is_a_real_op_in_this_torch():
    for name in ge_ops.load_ge_allowlist():
        obj = torch.ops
        for part in name.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)), name
        assert ge_ops.op_name(obj) == name


def test_op_name():
    assert ge_ops.op_name(aten.mul.Tensor) == "aten.mul.Tensor"
    assert ge_ops.op_name(aten._foreach_add.List) == "aten._foreach_add.List"
    assert ge_ops.op_name(torch.ops.prims.convert_element_type.default) == "prims.convert_element_type.default"
    assert ge_ops.op_name(aten.sym_size) == "aten.sym_size"
    assert ge_ops.op_name(operator.getitem) == "_operator.getitem"


def _rmsprop_like(p, g, v):
    v2 = aten.add.Tensor(aten.mul.Tensor(v, 0.99), aten.mul.Tensor(aten.mul.Tensor(g, g), 0.01))
    denom = aten.add.Tensor(aten.sqrt.default(v2), 1e-8)
    lerped = aten.lerp.Tensor(p, g, v)  # raises on GE
    shifted = aten.sub.Scalar(p, 1)  # raises on GE
    roots = torch._foreach_sqrt([p, g])  # raises on GE; its outputs are read via getitem
    return aten.div.Tensor(g, denom), lerped, shifted, roots[0] + roots[1]


def test_unsupported_ops_on_traced_graph():
    gm = make_fx(_rmsprop_like)(torch.rand(4), torch.rand(4), torch.rand(4))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    assert operator.getitem in targets  # the check must skip it
    assert ge_ops.unsupported_ops(gm.graph) == [
        "aten._foreach_sqrt.default",
        "aten.lerp.Tensor",
        "aten.sub.Scalar",
    ]


def test_unsupported_ops_ignores_python_callables_and_takes_a_custom_list():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(operator.add, (x, x))
    z = graph.call_function(aten.mul.Tensor, (y, x))
    graph.output(graph.call_function(torch.ops.prims.add.default, (z, z)))
    assert ge_ops.unsupported_ops(graph) == []
    assert ge_ops.unsupported_ops(graph, allowlist=["aten.mul.Tensor"]) == ["prims.add.default"]


def test_scan_rule_on_synthetic_sources():
    source = textwrap.dedent(
        '''
        @declare_supported([Support(F32(2))])
        @register_fx_node_ge_converter(torch.ops.aten.foo.Tensor)
        def ok(self, meta_outputs=None):
            """NB: doc"""
            if self is None:
                raise RuntimeError("partial support still counts as working")
            return ge.Foo(self)

        @register_fx_node_ge_converter(torch.ops.aten.foo.out)
        def stub(self, meta_outputs=None):
            """NB: doc"""
            raise NotImplementedError("not implemented")

        @register_fx_node_ge_converter(torch.ops.aten.foo.Scalar)
        def assert_stub(self):
            raise AssertionError("unsupported")

        @register_fx_node_ge_converter(getattr(torch.ops.aten.foo, "names", None))
        def by_getattr(self):
            return ge.Foo(self)

        @register_fx_node_ge_converter(torch.sym_sqrt)
        def not_an_op(self):
            return ge.Sqrt(self)

        def helper():
            raise ValueError("undecorated: ignored")
        '''
    )
    later = "@register_fx_node_ge_converter(torch.ops.aten.foo.Tensor)\ndef f(s):\n    raise RuntimeError()\n"
    working, stubs = gal.scan_converters({"a.py": source})
    assert working == {"aten.foo.Tensor", "aten.foo.names"}
    assert stubs == {"aten.foo.out", "aten.foo.Scalar"}
    working, stubs = gal.scan_converters({"a.py": source, "b.py": later})  # last registration wins
    assert "aten.foo.Tensor" in stubs and "aten.foo.Tensor" not in working


def test_generator_reproduces_committed_file(torch_npu_wheel, committed):
    document = gal.build_allowlist(torch_npu_wheel)
    assert document["torch_npu_version"] == committed["torch_npu_version"]
    assert document["ops"] == committed["ops"]
    assert document["stubs"] == committed["stubs"]
    if document["wheel_sha256"] == committed["wheel_sha256"]:
        assert document == committed


def test_cli_check_and_regenerate(torch_npu_wheel, committed, tmp_path, capsys):
    target = tmp_path / "allow.json"
    shutil.copy(ge_ops.ALLOWLIST_PATH, target)
    assert gal.main(["--wheel", str(torch_npu_wheel), "--output", str(target), "--check"]) == 0
    document = json.loads(target.read_text())
    document["ops"].remove("aten.mul.Tensor")
    target.write_text(json.dumps(document))
    assert gal.main(["--wheel", str(torch_npu_wheel), "--output", str(target), "--check"]) == 1
    assert "aten.mul.Tensor" in capsys.readouterr().err
    assert gal.main(["--wheel", str(torch_npu_wheel), "--output", str(target)]) == 0
    regenerated = json.loads(target.read_text())
    assert regenerated["ops"] == committed["ops"] and regenerated["stubs"] == committed["stubs"]


def test_fetch_reuses_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    wheel = tmp_path / f"torch_npu-{gal.TORCH_NPU_VERSION}-cp311-cp311-linux_aarch64.whl"
    wheel.write_bytes(b"not really a wheel")
    monkeypatch.setattr(_torchair_source.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert gal.fetch_torch_npu_wheel(tmp_path) == wheel


def test_fetch_failure_says_what_to_do(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert "--no-deps" in cmd and "download" in cmd  # never `pip install`
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(_torchair_source.subprocess, "run", offline)
    with pytest.raises(gal.WheelUnavailableError, match="No matching distribution.*--wheel PATH"):
        gal.fetch_torch_npu_wheel(tmp_path)


def test_tool_runs_as_a_script():
    """``python tools/ge_allowlist.py`` as the docs say (imports resolve outside pytest)."""
    import sys
    from pathlib import Path

    tool = Path(gal.__file__)
    proc = subprocess.run([sys.executable, str(tool), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--check" in proc.stdout
