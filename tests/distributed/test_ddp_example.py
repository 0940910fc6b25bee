"""examples/ddp_train.py under torchrun (``python -m torch.distributed.run``), 2 processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def test_ddp_train_example_under_torchrun():
    """The README-style command, shortened; ZeRO and bucket views are in test_engines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / "ddp_train.py"), "--steps", "30", "--lr", "3e-3", "--backend", "eager"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A session of its own: on a timeout the launcher *and* its workers are killed.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun did not finish in 240 s:\n{(stdout + stderr)[-4000:]}")
    out = stdout + stderr
    assert proc.returncode == 0, out[-4000:]
    assert "params identical on 2 ranks: True" in stdout, out[-4000:]
