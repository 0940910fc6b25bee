"""A smoke run of ``benchmarks/bench_first_step.py`` (the first step over many params),
run as a user runs it, from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_first_step_benchmark_smoke(tmp_path):
    out_json = tmp_path / "first.json"
    proc = subprocess.run(
        [sys.executable, "benchmarks/bench_first_step.py", "--params", "50,200", "--repeats", "1",
         "--json", str(out_json)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    assert set(data["first_step_s"]) == {"ours", "foreach", "for_loop"}
    for by_n in data["first_step_s"].values():
        assert set(by_n) == {"50", "200"} and all(v > 0 for v in by_n.values())
    assert "| 200 |" in proc.stdout
