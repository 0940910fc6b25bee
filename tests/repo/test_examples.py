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


def test_train_loss_falls_and_reports_step_times():
    out = run_example("examples/train.py", "--steps", "120")
    assert "OK: loss fell" in out
    assert "NpuFusedRMSprop" in out and "torch.optim.RMSprop" in out and " ms" in out


def test_npu_quickstart_matches_torch():
    assert "OK: NpuFusedRMSprop matches torch.optim.RMSprop" in run_example("examples/npu_quickstart.py")


def test_debug_graphs_shows_the_dumps(tmp_path):
    out = run_example(str(ROOT / "examples/debug_graphs.py"), "--out", str(tmp_path / "dumps"), cwd=tmp_path)
    assert "aten_after_fusion.py" in out and "torch.ops.aten.sqrt.default" in out


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_a_docstring_with_its_command(script):
    text = (ROOT / "examples" / script).read_text()
    assert text.startswith('"""') and f"examples/{script}" in text.split('"""')[1]
