"""tools/gpu_check.sh on this machine (no GPU): it says so, installs nothing, fills its folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run tools/gpu_check.sh itself (minutes)")
def test_gpu_check_without_a_gpu_reports_it_and_fills_its_folder(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHON=sys.executable, PIP_NO_INDEX="1")
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert {"environment.txt", "nvidia-smi.txt", "pytest.log", "pytest.xml", "bench.log", "summary.txt"} <= {
        p.name for p in out.iterdir()}
    summary = (out / "summary.txt").read_text()
    assert "gpu: none (no GPU" in summary and "tests (pytest -m cuda): ok" in summary, summary
    assert "tests/devices/test_on_device.py" in summary
    environment = (out / "environment.txt").read_text()
    assert f"torch: {torch.__version__}" in environment
    # the package came from the linked source, not from an install or the source folder itself
    imported = next(line for line in environment.splitlines() if line.startswith("npu_optim_compile imported from:"))
    assert "/site/npu_optim_compile/__init__.py" in imported, imported
    junit = (out / "pytest.xml").read_text()
    assert 'skipped="' in junit and "test_on_device" in junit and "CUDA is not available" in junit
    assert "CUDA is not available here" in (out / "bench.log").read_text()


def test_gpu_check_usage():
    run = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh")], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage: tools/gpu_check.sh OUTDIR" in run.stderr
