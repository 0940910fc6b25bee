"""Graph dumps with inductor: the files, the summary, the env var, FX-cache hits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from parity import make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile._dump import DUMP_ENV

FILES = {"dynamo_graph.py", "aten_before_fusion.py", "aten_after_fusion.py", "inductor_output_code.py", "summary.json"}


def one_step(dump_dir=None, **kwargs):
    po = make_params() + [torch.nn.Parameter(torch.randn(6, dtype=torch.float64))]
    opt = NpuFusedRMSprop(po, momentum=0.9, backend="inductor", dump_dir=dump_dir, **kwargs)
    set_grads(0, po)
    opt.step()
    return opt


def test_dump_dir_writes_every_file_per_graph(tmp_path):
    one_step(tmp_path)
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2  # one graph per dtype structure: fp32 and fp64
    for folder in folders:
        assert FILES <= {p.name for p in folder.iterdir()}
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["kernels_expected"] == 1
        assert summary["foreach_ops_rewritten"] > 0
        assert summary["compile_seconds"] > 0
        assert [b["tensors"] for b in summary["buckets"]] == [4, 1]
        assert "torch.ops.aten._foreach" in (folder / "aten_before_fusion.py").read_text()
        assert "torch.ops.aten._foreach" not in (folder / "aten_after_fusion.py").read_text()
        assert "cpp_pybinding" in (folder / "inductor_output_code.py").read_text()


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot is not installed")
def test_svg_drawings_when_graphviz_is_installed(tmp_path):
    pytest.importorskip("pydot")
    one_step(tmp_path)
    folder = sorted(tmp_path.iterdir())[0]
    svgs = {p.name for p in folder.glob("*.svg")}
    assert svgs == {"dynamo_graph.svg", "aten_before_fusion.svg", "aten_after_fusion.svg"}
    assert (folder / "aten_after_fusion.svg").read_text().lstrip().startswith("<?xml")


def test_environment_variable_turns_dumps_on(tmp_path, monkeypatch):
    monkeypatch.setenv(DUMP_ENV, str(tmp_path))
    opt = one_step()
    assert opt.dump_dir == str(tmp_path)
    assert len(list(tmp_path.iterdir())) == 2


def test_no_dump_dir_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(DUMP_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert one_step().dump_dir == ""
    assert list(tmp_path.iterdir()) == []


SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from torch._dynamo.utils import counters
    from npu_optim_compile import NpuFusedRMSprop
    p = torch.nn.Parameter(torch.randn(16))
    opt = NpuFusedRMSprop([p], backend="inductor", dump_dir=sys.argv[1])
    p.grad = torch.randn(16)
    opt.step()
    print(json.dumps(dict(counters["inductor"])))
    """
)


def test_dumps_appear_on_an_fx_graph_cache_hit(tmp_path):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    env.pop(DUMP_ENV, None)
    runs = []
    for run in ("cold", "warm"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / run)], env=env,
                             capture_output=True, text=True, timeout=300, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0].get("fxgraph_cache_miss", 0) >= 1
    assert runs[1].get("fxgraph_cache_hit", 0) >= 1  # the warm run hit the cache ...
    (folder,) = (tmp_path / "warm").iterdir()
    assert FILES <= {p.name for p in folder.iterdir()}  # ... and still dumped everything
