"""The supported torch range: one range in pyproject, README and the import check; the
README's commands pin the local torch 2.13; tools/torch_versions.py plans its runs."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest
import torch

import torch_versions
from npu_optim_compile import _torch_version

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    return block.group(1).strip().splitlines()


def test_pyproject_requires_the_range_the_import_checks():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_reqs = [r for r in project["dependencies"] if re.match(r"torch\b", r)]
    assert torch_reqs == [_torch_version.REQUIREMENT]
    assert project["optional-dependencies"]["npu"] == ["torch_npu==2.13.0"]  # it needs torch 2.13


def test_readme_states_the_range_and_ci_runs_its_test_command():
    assert f"`{_torch_version.REQUIREMENT}`" in README
    install, test = readme_commands()
    for command in (install, test):
        assert '"torch==2.13.*"' in command  # the local CPU wheel, in seconds; never a download
    assert test.endswith("python -m pytest")
    assert test in (ROOT / ".ci" / "run").read_text().splitlines()


def test_installed_torch_passes_the_check_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _torch_version.check_torch_version(torch.__version__)


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0a0+git1234", "2.12.1+cu130", "2.13.0+cpu", "not.a.version"])
def test_versions_in_range_pass(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _torch_version.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.10.0", "2.10.1+cu128", "1.13.1"])
def test_older_torch_raises_naming_both_versions(version):
    with pytest.raises(ImportError, match=re.escape(f"torch {version} is installed")) as info:
        _torch_version.check_torch_version(version)
    assert _torch_version.REQUIREMENT in str(info.value) and 'pip install "torch==2.13.*"' in str(info.value)


def test_newer_torch_warns_untested():
    with pytest.warns(UserWarning, match=r"torch 2\.14\.0 is newer and untested"):
        _torch_version.check_torch_version("2.14.0")


def test_import_stops_on_an_old_torch_before_anything_else():
    """A real import in a fresh interpreter whose torch reports 2.10.0."""
    code = "import torch; torch.__version__ = '2.10.0'; import npu_optim_compile"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: npu_optim_compile needs torch>=2.11,<2.14"), out.stderr
    assert "torch 2.10.0 is installed" in last


def test_tool_plans_a_pinned_install_and_a_pytest_run(tmp_path):
    args = torch_versions.parse_args(["2.11", "tests/math", "--venv", str(tmp_path / "v"), "--", "-x", "-k", "parity"])
    (venv_cmd, _), (pip_cmd, _), (check_cmd, _), (pytest_cmd, env) = torch_versions.plan(args)
    assert venv_cmd[1:] == ["-m", "venv", str(tmp_path / "v")]
    assert pip_cmd[1:] == ["-m", "pip", "install", "torch==2.11.*", "-e", ".[test]"]
    assert check_cmd[-1] == "2.11"
    assert pytest_cmd[1:] == ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/math", "-x", "-k", "parity"]
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "v" / "inductor-cache")}


def test_tool_reuses_an_existing_venv_and_checks_the_torch_it_runs(tmp_path):
    python = tmp_path / "v" / "bin" / "python"  # an existing environment: this interpreter
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    running = ".".join(torch.__version__.split(".")[:2])  # 2.13 in CI; the tool's own runs use others
    steps = torch_versions.plan(torch_versions.parse_args([running, "--venv", str(tmp_path / "v")]))
    assert [cmd[1:3] for cmd, _ in steps] == [["-m", "pip"], ["-c", torch_versions.CHECK], ["-m", "pytest"]]
    check = subprocess.run(steps[1][0], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr  # this venv has that torch and this checkout
    assert str(ROOT / "npu_optim_compile") in check.stdout
    wrong = subprocess.run([*steps[1][0][:-1], "1.0"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 3


def test_tool_dry_run_prints_the_commands_and_rejects_a_bad_version(tmp_path):
    out = subprocess.run(
        [sys.executable, "tools/torch_versions.py", "2.12", "--venv", str(tmp_path / "v"), "--dry-run"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 4 and "'torch==2.12.*'" in lines[1] and "-m pytest" in lines[3]
    assert not (tmp_path / "v").exists()  # nothing ran
    bad = subprocess.run([sys.executable, "tools/torch_versions.py", "2.x"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "MAJOR.MINOR" in bad.stderr


@pytest.mark.parametrize(
    "output, line",
    [
        ("..F\n=== 1 failed, 2 passed, 1 skipped in 3.10s ===\n", "1 failed, 2 passed, 1 skipped in 3.10s"),
        ("....\n4 passed in 0.5s\nrc=0\n", "4 passed in 0.5s"),
        ("ERROR: file or directory not found: x\n", ""),
    ],
)
def test_tool_reads_pytests_closing_line(output, line):
    assert torch_versions.closing_line(output) == line
