"""python -m npu_optim_compile explain / dump, in a subprocess as a user runs it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

ARGS = ["--tensors", "30", "--elements", "3000", "--dtypes", "float32,float64", "--momentum", "0.9"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "npu_optim_compile", *args], capture_output=True, text=True,
                          timeout=timeout)


def run_cli(*args: str) -> str:
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def assert_usage_error(out: subprocess.CompletedProcess, command: str) -> str:
    """Exit status 2 and one ``error:`` line on stderr (argparse's own form), no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"python -m npu_optim_compile {command}: error: "), out.stderr
    return lines[0]


@pytest.fixture(scope="module")
def explained() -> str:
    return run_cli("explain", *ARGS)


def test_explain_prints_one_row_per_bucket(explained):
    lines = explained.split("\n\n")[0].splitlines()  # the table, without the note below it
    header, rows = lines[0].split(), [line.split() for line in lines[2:] if line.strip()]
    assert header[:4] == ["bucket", "dtype", "tensors", "elements"]
    assert [(r[4], r[5], r[6], r[7]) for r in rows] == [("float32", "15", "1,500", "1"), ("float64", "15", "1,500", "1")]
    assert all(float(r[8]) > 0 for r in rows)  # compile seconds


def test_explain_names_no_graph_folder_it_has_deleted(explained):
    """explain dumps into a temporary folder it removes: its table must not name those folders."""
    assert "graph files" not in explained.splitlines()[0] and "rmsprop_bucket_step" not in explained
    assert "`dump --out DIR` keeps them" in explained


def test_dump_keeps_the_files(tmp_path):
    out = run_cli("dump", "--out", str(tmp_path), *ARGS)
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2 and all(name in out for name in folders)
    for folder in tmp_path.iterdir():
        assert (folder / "aten_after_fusion.py").exists() and (folder / "summary.json").exists()


def test_dump_lists_only_this_runs_folders(tmp_path):
    """A second dump into the same folder names its own graph folders, not the first run's."""
    args = ["--tensors", "4", "--elements", "40"]  # one bucket
    first = run_cli("dump", "--out", str(tmp_path), *args)
    before = {p.name for p in tmp_path.iterdir()}
    assert len(before) == 1 and all(name in first for name in before)
    second = run_cli("dump", "--out", str(tmp_path), *args)
    new = {p.name for p in tmp_path.iterdir()} - before
    assert len(new) == 1 and all(name in second for name in new), second
    assert not any(name in second for name in before), second


def test_bad_arguments_say_what_is_wrong():
    line = assert_usage_error(cli("explain", "--dtypes", "int8", timeout=120), "explain")
    assert "--dtypes: unknown floating dtype 'int8'" in line
    line = assert_usage_error(cli("explain", "--tensors", "0", timeout=120), "explain")
    assert "need 1 <= --tensors <= --elements" in line


def test_dump_to_a_folder_that_cannot_be_written_names_out():
    line = assert_usage_error(cli("dump", "--out", "/proc/nope", timeout=120), "dump")
    assert "--out '/proc/nope' is not a writable folder" in line
    assert "dump_dir" not in line and "NPU_OPTIM_COMPILE_DUMP_DIR" not in line and "unset" not in line


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_torchair_backend_without_torch_npu_is_one_error_line():
    line = assert_usage_error(cli("explain", "--backend", "torchair", "--tensors", "3", "--elements", "30",
                                  timeout=120), "explain")
    assert "needs torchair" in line and "inductor" in line  # what is missing, and what works instead
    assert line.count("pip install 'npu-optim-compile[npu]'") == 1, line


def test_invalid_hyperparameter_is_a_usage_error_not_a_traceback():
    line = assert_usage_error(cli("explain", "--lr", "-1", timeout=120), "explain")
    assert "error: Invalid learning rate: -1.0" in line


def test_help_is_plain_text():
    out = subprocess.run([sys.executable, "-m", "npu_optim_compile", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "explain --tensors 1000" in out.stdout
    assert "``" not in out.stdout and ":func:" not in out.stdout
