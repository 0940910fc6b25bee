"""The examples run as written (in a subprocess, from the repository root)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_example(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def _timing_rows(out: str) -> dict[str, list[float]]:
    """The numbers of the medians table: name -> [iteration ms, step ms]."""
    rows = {}
    for name in ("NpuFusedRMSprop", "torch.optim.RMSprop", "torch.compile(opt.step)", "compile_train_step(NpuFusedRMSprop)"):
        for line in out.splitlines():
            if line.strip().startswith(name + " ") and " ms" in line:
                rows[name] = [float(x) for x in line.replace(name, "").split("ms")[0:2] if x.strip()[:1].isdigit()]
    return rows


def test_train_loss_falls_and_reports_iteration_and_step_times():
    out = run_example("examples/train.py", "--steps", "120")
    assert "OK: loss fell: mean of the first 10 steps" in out
    rows = _timing_rows(out)
    assert set(rows) == {"NpuFusedRMSprop", "torch.optim.RMSprop", "torch.compile(opt.step)"}, out
    assert all(len(v) == 2 and v[0] > v[1] > 0 for v in rows.values()), rows  # iteration > step > 0


def test_train_through_a_compiled_train_step():
    out = run_example("examples/train.py", "--steps", "40", "--compile", "--no-baselines")
    assert "OK: loss fell" in out
    rows = _timing_rows(out)
    assert list(rows) == ["compile_train_step(NpuFusedRMSprop)"] and rows["compile_train_step(NpuFusedRMSprop)"][0] > 0


def test_npu_quickstart_matches_torch():
    assert "OK: NpuFusedRMSprop matches torch.optim.RMSprop" in run_example("examples/npu_quickstart.py")


def test_debug_graphs_shows_the_dumps(tmp_path):
    out = run_example(str(ROOT / "examples/debug_graphs.py"), "--out", str(tmp_path / "dumps"), cwd=tmp_path)
    assert "aten_after_fusion.py" in out and "torch.ops.aten.sqrt.default" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_a_docstring_with_its_command(script):
    text = (ROOT / "examples" / script).read_text()
    assert text.startswith('"""') and f"examples/{script}" in text.split('"""')[1]
