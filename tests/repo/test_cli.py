"""python -m npu_optim_compile explain / dump, in a subprocess as a user runs it."""

from __future__ import annotations

import subprocess
import sys

ARGS = ["--tensors", "30", "--elements", "3000", "--dtypes", "float32,float64", "--momentum", "0.9"]


def run_cli(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "npu_optim_compile", *args], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_explain_prints_one_row_per_bucket():
    lines = run_cli("explain", *ARGS).splitlines()
    header, rows = lines[0].split(), [line.split() for line in lines[2:] if line.strip()]
    assert header[:4] == ["bucket", "dtype", "tensors", "elements"]
    assert [(r[4], r[5], r[6], r[7]) for r in rows] == [("float32", "15", "1,500", "1"), ("float64", "15", "1,500", "1")]
    assert all(float(r[8]) > 0 for r in rows)  # compile seconds


def test_dump_keeps_the_files(tmp_path):
    out = run_cli("dump", "--out", str(tmp_path), *ARGS)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and all(name in out for name in folders)
    for folder in tmp_path.iterdir():
        assert (folder / "aten_after_fusion.py").exists() and (folder / "summary.json").exists()


def test_bad_arguments_say_what_is_wrong():
    out = subprocess.run([sys.executable, "-m", "npu_optim_compile", "explain", "--dtypes", "int8"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "unknown floating dtype 'int8'" in out.stderr


def test_invalid_hyperparameter_is_a_usage_error_not_a_traceback():
    out = subprocess.run([sys.executable, "-m", "npu_optim_compile", "explain", "--lr", "-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "error: Invalid learning rate: -1.0" in out.stderr and "Traceback" not in out.stderr


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, "-m", "npu_optim_compile", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "explain --tensors 1000" in out.stdout
    assert "``" not in out.stdout and ":func:" not in out.stdout
