"""Run the test suite on another torch: build a virtual environment with it, then pytest.

A developer tool, not part of the installed package. CI runs torch 2.13 only; this is
how the other versions in README's "Supported torch versions" table were measured, and
how to measure them again (one command each)::

    python tools/torch_versions.py 2.11                        # whole suite
    python tools/torch_versions.py 2.12 tests/optimizer tests/math tests/compile tests/passes
    python tools/torch_versions.py 2.11 --venv /work/venvs/torch211 -- -x -k parity
    python tools/torch_versions.py 2.11 --dry-run              # print the commands only

Steps: ``python -m venv VENV`` (unless it exists), ``VENV/bin/pip install
"torch==X.Y.*" -e ".[test]"`` (torch pinned in every pip command: PyPI's wheel with its
CUDA libraries is about 3 GB and runs on the CPU; pip skips what is installed already),
a check that VENV imports that torch and this checkout's package, then ``VENV/bin/python
-m pytest -q`` with its own inductor cache (``VENV/inductor-cache``: compiled kernels are
not shared between torch versions). The last line printed is
``torch <version>: <pytest's closing line>``; the exit status is pytest's.

VENV defaults to ``.venv-torchX.Y`` in the repository root (git ignores ``.venv*/``).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = (
    "import sys, torch, npu_optim_compile as m; "
    "print(torch.__version__, m.__file__); "
    "sys.exit(0 if torch.__version__.startswith(sys.argv[1] + '.') else 3)"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/torch_versions.py",
        description="Build a virtual environment with another torch and run the test suite there.",
        epilog="Arguments after the test paths (or after --) go to pytest.",
    )
    parser.add_argument("version", help="torch minor version, e.g. 2.11 (installs torch==2.11.*)")
    parser.add_argument("pytest_args", nargs="*", help="test paths and pytest options (default: the whole suite)")
    parser.add_argument("--venv", type=Path, help="virtual environment to build or reuse (default: .venv-torchVERSION)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the venv (default: this one)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.pytest_args += extra
    if not re.fullmatch(r"\d+\.\d+", args.version):
        parser.error(f"version must be MAJOR.MINOR such as 2.11, got {args.version!r}")
    if args.venv is None:
        args.venv = ROOT / f".venv-torch{args.version}"
    return args


def plan(args: argparse.Namespace) -> list[tuple[list[str], dict[str, str]]]:
    """The commands to run, in order, each with the environment variables it adds."""
    venv = args.venv.absolute()
    py = str(venv / "bin" / "python")
    steps: list[tuple[list[str], dict[str, str]]] = []
    if not (venv / "bin" / "python").exists():
        steps.append(([args.python, "-m", "venv", str(venv)], {}))
    steps.append(([py, "-m", "pip", "install", f"torch=={args.version}.*", "-e", ".[test]"], {}))
    steps.append(([py, "-c", CHECK, args.version], {}))
    pytest_cmd = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args]
    steps.append((pytest_cmd, {"TORCHINDUCTOR_CACHE_DIR": str(venv / "inductor-cache")}))
    return steps


def show(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, cmd)])


def closing_line(output: str) -> str:
    """pytest's closing summary ('3 failed, 10 passed in 5.0s'), or '' when there is none."""
    for line in reversed(output.splitlines()):
        line = line.strip("= ").strip()
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", line) and " in " in line:
            return line
    return ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    steps = plan(args)
    if args.dry_run:
        for cmd, env in steps:
            print(f"(cd {shlex.quote(str(ROOT))} && {show(cmd, env)})")
        return 0
    *setup, (pytest_cmd, pytest_env) = steps
    for cmd, env in setup:
        print("+", show(cmd, env), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env={**os.environ, **env})
        if rc:
            print(f"torch {args.version}: setup failed (exit {rc}): {show(cmd, env)}", flush=True)
            return rc
    print("+", show(pytest_cmd, pytest_env), flush=True)
    proc = subprocess.Popen(
        pytest_cmd, cwd=ROOT, env={**os.environ, **pytest_env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    rc = proc.wait()
    version = subprocess.run([pytest_cmd[0], "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    print(f"torch {version.stdout.strip() or args.version}: {closing_line(''.join(lines)) or f'pytest exit {rc}'}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
