#!/usr/bin/env bash
# tools/gpu_check.sh OUTDIR: everything this project checks on a GPU, in one command.
#
# For a fresh machine with a CUDA build of torch (2.11 or later) and pytest installed and
# no network. It installs nothing and never touches the machine's torch: the package is
# put on PYTHONPATH through a folder of links (npu_optim_compile/*, and passes/ as
# npu_optim_compile/passes, as pyproject.toml's package-dir maps it), and everything runs
# from a scratch folder so that the source folder itself is never imported. Then:
#
#   1. the CUDA variants of the tests: python -m pytest -m cuda over the test files that
#      have them (tests/devices/ and any other using tests/support/devices.py), with a
#      time limit;
#   2. a short CUDA benchmark: benchmarks/bench_rmsprop.py --device cuda
#      --side-by-side-only --quick (ours, foreach=True, capturable=True,
#      torch.compile(opt.step) and the copy floor, interleaved), then its Markdown table.
#
# Every result goes into OUTDIR: environment.txt (date, python, torch and its CUDA, the
# GPU, where the package was imported from), nvidia-smi.txt, pytest.xml (junit) and
# pytest.log, bench_cuda.json, bench_cuda.md and bench.log, summary.txt (one line per
# phase: its exit status and seconds). Without a GPU it says so ("no GPU") and still
# fills OUTDIR: the tests are collected and skipped, the benchmark measures nothing.
#
# Time: under 8 minutes in all (limits GPU_CHECK_TEST_S=240 and GPU_CHECK_BENCH_S=180,
# in seconds). PYTHON picks the interpreter (default: python3).
# Exit status: 0 when every phase passed (with or without a GPU), 1 when one failed,
# 2 on bad usage.
set -uo pipefail

if [ $# -ne 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: tools/gpu_check.sh OUTDIR   (see the comment at the top of this file)" >&2
  exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create the output folder $1" >&2; exit 2; }
out="$(cd "$1" && pwd)"
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
test_s="${GPU_CHECK_TEST_S:-240}"
bench_s="${GPU_CHECK_BENCH_S:-180}"
command -v "$python" >/dev/null 2>&1 || { echo "gpu_check: no $python on PATH (set PYTHON)" >&2; exit 2; }

scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
site="$scratch/site"
mkdir -p "$site/npu_optim_compile"
for f in "$root"/npu_optim_compile/*; do
  [ "$(basename "$f")" = "__pycache__" ] || ln -s "$f" "$site/npu_optim_compile/"
done
ln -s "$root/passes" "$site/npu_optim_compile/passes"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export TORCHINDUCTOR_CACHE_DIR="$scratch/inductor_cache"
# Offline: pip (should anything call it) never reaches for the network.
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$scratch" || exit 2

summary="$out/summary.txt"
: >"$summary"
failed=0
phase() {  # phase NAME LIMIT_S LOG COMMAND...: run it with a time limit, record status and time
  local name=$1 limit=$2 log=$3 start rc
  shift 3
  echo "== $name (limit ${limit} s) =="
  start=$(date +%s)
  # SIGINT first: pytest then still writes its junit XML and summary; the benchmark
  # kills its running worker and keeps the JSON it wrote.
  timeout --signal=INT --kill-after=20 "$limit" "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  local took=$(( $(date +%s) - start ))
  case $rc in
    0) echo "$name: ok (${took} s)" >>"$summary" ;;
    124|130|137) echo "$name: TIMED OUT after ${limit} s (exit $rc)" >>"$summary"; failed=1 ;;
    *) echo "$name: FAILED (exit $rc, ${took} s)" >>"$summary"; failed=1 ;;
  esac
}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(uname -a)"
  echo "repository: $root (commit $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo "python: $(command -v "$python")"
  "$python" - <<'EOF'
import platform, sys
print("python version:", platform.python_version())
try:
    import torch
except ImportError as e:
    print("torch: NOT IMPORTABLE:", e)
    sys.exit()
print("torch:", torch.__version__, "| CUDA build:", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"gpu {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
          f"{p.multi_processor_count} SMs")
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
try:
    import pytest
    print("pytest:", pytest.__version__)
except ImportError:
    print("pytest: NOT INSTALLED (the tests cannot run)")
import npu_optim_compile
print("npu_optim_compile imported from:", npu_optim_compile.__file__)
EOF
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"
if ! grep -q "^npu_optim_compile imported from: $site/" "$out/environment.txt"; then
  echo "environment: FAILED (npu_optim_compile not importable from the linked source; see environment.txt)" >>"$summary"
  failed=1
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  { nvidia-smi; echo; nvidia-smi -q; } >"$out/nvidia-smi.txt" 2>&1
else
  echo "nvidia-smi: not found on PATH" >"$out/nvidia-smi.txt"
fi
if "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  gpu=yes
  echo "gpu: $("$python" -c 'import torch; print(torch.cuda.get_device_name(0))')" >>"$summary"
else
  gpu=no
  echo "gpu: none (no GPU: torch.cuda.is_available() is False; the CUDA tests are collected and skipped," \
       "the CUDA benchmark measures nothing)" >>"$summary"
  echo "no GPU: torch.cuda.is_available() is False"
fi

timeout_plugin=()
if "$python" -c "import pytest_timeout" 2>/dev/null; then
  timeout_plugin=(--timeout 150)  # one hung test does not eat the whole limit
fi
# The test files with CUDA variants: those using the device fixture (a test function with a
# `device` argument), DEVICES or the cuda mark (tests/support/devices.py). Only those are
# collected: other files may import test-only packages this machine lacks (expecttest).
mapfile -t cuda_files < <(cd "$root" && grep -rlE --include='test_*.py' \
  '^def test_[A-Za-z0-9_]*\((.*, *)?device\b|\bDEVICES\b|mark\.cuda' tests | sort)
[ ${#cuda_files[@]} -gt 0 ] || cuda_files=(tests/devices)
echo "test files with CUDA variants: ${cuda_files[*]}" >>"$summary"
phase "tests (pytest -m cuda)" "$test_s" "$out/pytest.log" \
  "$python" -m pytest -c "$root/pyproject.toml" --rootdir "$root" "${cuda_files[@]/#/$root/}" -m cuda \
  -p no:cacheprovider -v -rA --durations 15 ${timeout_plugin[@]+"${timeout_plugin[@]}"} \
  --junitxml "$out/pytest.xml" -o junit_family=xunit2

# The benchmark writes its JSON after every worker: a run cut short keeps what it measured.
phase "benchmark (--device cuda --side-by-side-only --quick)" "$bench_s" "$out/bench.log" \
  "$python" "$root/benchmarks/bench_rmsprop.py" --device cuda --side-by-side-only --quick \
  --models 200x4M,20x50M,1000tiny,mixed --tc-models 200x4M,20x50M --worker-timeout 120 \
  --cache-dir "$scratch/bench_cache" --json "$out/bench_cuda.json"
if [ -s "$out/bench_cuda.json" ]; then
  "$python" "$root/benchmarks/bench_rmsprop.py" --table --json "$out/bench_cuda.json" >"$out/bench_cuda.md" 2>&1
fi
rm -f "$out/bench_cuda.png"  # drawn by the run when matplotlib is there; the JSON and table hold it all

echo
echo "== summary ($out/summary.txt) =="
cat "$summary"
exit $failed
