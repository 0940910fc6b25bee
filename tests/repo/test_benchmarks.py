"""The benchmarks run: a seconds-long smoke run of ``benchmarks/bench_rmsprop.py`` (tiny
model, quick, no torch.compile baselines), its ``--table`` and ``--plot``, ``--profile``,
and ``benchmarks/bench_grouping.py`` with a few tensors.

Each runs as a user runs it, in a subprocess from the repository root. They share
torch's own inductor cache directory (``--cache-dir default``), as the rest of the test
suite does, so that only the first compile of a session is cold.
"""

from __future__ import annotations

import getpass
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = "benchmarks/bench_rmsprop.py"
SMOKE_LOOPS = ("default", "compiled")
EAGER_METHODS = ("ours", "foreach")
COMPILED_METHODS = ("no_step", "ours", "ours_cts")
SUMMARY_KEYS = {"median_s", "p25_s", "p75_s", "min_s", "n"}


def torch_cache_dir() -> str:
    """torch's own inductor cache directory (``default_cache_dir()``'s formula)."""
    user = re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser())
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")


def run(*args: str, timeout: float = 300) -> str:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=torch_cache_dir())
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def check_summary(s: dict, where: str) -> None:
    assert isinstance(s, dict) and SUMMARY_KEYS <= set(s), f"{where}: {s!r}"
    assert s["n"] >= 5, where
    assert all(positive(s[k]) for k in ("median_s", "p25_s", "p75_s", "min_s")), f"{where}: {s!r}"
    assert s["min_s"] <= s["p25_s"] <= s["median_s"] <= s["p75_s"], f"{where}: {s!r}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict, str]:
    path = tmp_path_factory.mktemp("bench") / "smoke.json"
    out = run(BENCH, "--quick", "--models", "tiny", "--skip-torch-compile", "--loops", ",".join(SMOKE_LOOPS),
              "--loop-methods", "ours,ours_cts,foreach,no_step", "--cache-dir", "default", "--json", str(path))
    return path, json.loads(path.read_text()), out


def test_help_lists_the_options():
    out = run(BENCH, "--help", timeout=60)
    for option in ("--quick", "--models", "--skip-torch-compile", "--tc-models", "--threads", "--json", "--table",
                   "--plot", "--profile", "--device", "--loops", "--loop-methods", "--loop", "--worker-timeout",
                   "--side-by-side-only", "--skip-side-by-side"):
        assert option in out


def test_smoke_run_records_every_measurement(smoke):
    _, data, out = smoke
    assert {"machine", "config", "models"} <= set(data)
    assert data["config"]["quick"] and data["config"]["loops"] == list(SMOKE_LOOPS)
    e = data["models"]["tiny"]
    assert e["tensors"] == 8 and e["numel"] == 288 and positive(e["floor_bytes"])
    failed = {k: v["error"] for k, v in e.items() if isinstance(v, dict) and "error" in v}
    failed.update({f"{loop}/{m}": r["error"] for loop, rs in e["loops"].items() for m, r in rs.items() if "error" in r})
    assert not failed, "\n".join(f"{k}:\n{v}" for k, v in failed.items())
    # step-only
    for key in ("foreach", "for_loop", "flat_kernel"):
        check_summary(e["baseline"][key], f"baseline/{key}")
    assert positive(e["baseline"]["triad"]["bandwidth_GBps"])
    for phase in ("ours_cold", "ours_warm"):
        check_summary(e[phase]["step"], f"{phase}/step")
        assert positive(e[phase]["first_call_s"]) and e[phase]["cache"] in ("cold", "warm")
    check_summary(e["ours_warm"]["fresh_grads"], "ours_warm/fresh_grads")
    # side by side, interleaved in one process (no capturable=True on the CPU, no torch.compile here)
    side = e["side_by_side"]
    assert side["device"] == "cpu" and side["timer"] == "perf_counter" and side["rounds"] >= 5
    assert set(side["methods"]) == {"ours", "foreach"}, side["methods"]
    for method, r in side["methods"].items():
        check_summary(r["step"], f"side_by_side/{method}")
        assert positive(r["first_call_s"]) and r["what"], method
    assert positive(side["copy"]["bandwidth_GBps"]) and positive(side["floor_s"])
    assert side["floor_s"] == pytest.approx(e["floor_bytes"] / (side["copy"]["bandwidth_GBps"] * 1e9))
    assert positive(e["ours_mem"]["persistent_bytes"])
    # training loops
    assert e["net"]["tensors"] == 8 and e["net"]["numel"] == 288
    assert set(e["loops"]) == set(SMOKE_LOOPS)
    for loop in SMOKE_LOOPS:
        methods = COMPILED_METHODS if loop == "compiled" else EAGER_METHODS
        assert set(e["loops"][loop]) == set(methods), loop
        for method in methods:
            r, where = e["loops"][loop][method], f"{loop}/{method}"
            assert r["cache"] in ("cold", "warm") and r["what"], where
            assert r["net"]["tensors_built"] == 8 and r["finite"], where
            assert r["denormal_grad_fraction"] == 0 and r["denormal_state_fraction"] in (0, None), where
            assert positive(r["first_call_s"]) and len(r["first_calls_s"]) == 3, where
            check_summary(r["iteration"], f"{where}/iteration")
            if loop == "compiled":
                assert r["step"] is None, where
            else:
                for part in ("zero_grad", "forward", "backward", "step"):
                    check_summary(r[part], f"{where}/{part}")
                assert r["step"]["median_s"] < r["iteration"]["median_s"], where
    assert "wrote" in out


@pytest.fixture
def bench(monkeypatch):
    """Import the benchmark's modules by name, as its workers do (sys.path and the
    imported modules restored afterwards)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    before = set(sys.modules)
    yield importlib.import_module
    for name in set(sys.modules) - before:
        if name in ("common", "report", "report_loops", "side_by_side", "workers"):
            del sys.modules[name]


def test_side_by_side_methods_per_device(bench):
    """capturable=True only on CUDA (torch refuses it on the CPU); torch.compile when asked."""
    sbs = bench("side_by_side")
    assert sbs.methods_for("cuda", True) == ["ours", "foreach", "capturable", "tc_step"]
    assert sbs.methods_for("cuda", False) == ["ours", "foreach", "capturable"]
    assert sbs.methods_for("cpu", True) == ["ours", "foreach", "tc_step"]
    if not torch_cuda_available():
        import torch

        with pytest.raises(Exception, match="capturable"):  # why the CPU leaves it out
            p = torch.nn.Parameter(torch.ones(2))
            p.grad = torch.ones(2)
            torch.optim.RMSprop([p], capturable=True, foreach=True).step()


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_side_by_side_table_of_a_cuda_result(bench):
    """The table a CUDA run prints: every method's median, the floor and ours / floor."""
    sbs = bench("side_by_side")

    def summary(median):
        return {"median_s": median, "p25_s": median, "p75_s": median, "min_s": median, "n": 5}

    result = {"device": "cuda", "timer": "cuda_events", "block": 10, "floor_s": 20e-6, "rounds": 5,
              "copy": {"bandwidth_GBps": 4000.0},
              "methods": {"ours": {"first_call_s": 4.0, "step": summary(30e-6)},
                          "foreach": {"first_call_s": 0.1, "step": summary(300e-6)},
                          "capturable": {"first_call_s": 0.1, "step": summary(250e-6)},
                          "tc_step": {"first_call_s": 40.0, "step": summary(40e-6)}}}
    data = {"machine": {"gpu": "NVIDIA H200", "cuda": "13.0"}, "models": {"200x4M": {"side_by_side": result}}}
    lines = sbs.side_by_side_table(data)
    row = next(line for line in lines if line.startswith("| 200x4M |"))
    assert row == "| 200x4M | 0.02 | **0.03** | 0.3 | 0.25 | 0.04 | 1.50× | 4.00 / 40 |", row
    assert "(cuda;" in lines[0] and "timer: cuda_events" in lines[-1]
    assert "NVIDIA H200 (CUDA 13.0)" in bench("report").table(data)


def test_device_cuda_without_a_gpu_exits_cleanly():
    if torch_cuda_available():
        pytest.skip("a GPU is here: tools/gpu_check.sh runs the CUDA benchmark")
    out = run(BENCH, "--device", "cuda", "--side-by-side-only", "--quick", "--models", "tiny", timeout=120)
    assert "CUDA is not available here" in out
    bad = subprocess.run([sys.executable, BENCH, "--side-by-side-only", "--skip-side-by-side"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "exclude each other" in bad.stderr


def test_smoke_run_interleaves_each_loop(smoke):
    """Every method of a loop in one process, taking turns: steady figures for each."""
    _, data, _ = smoke
    side = data["models"]["tiny"]["loops_side"]
    assert set(side) == set(SMOKE_LOOPS)
    for loop in SMOKE_LOOPS:
        methods = COMPILED_METHODS if loop == "compiled" else EAGER_METHODS
        assert set(side[loop]["methods"]) == set(methods), loop
        for method in methods:
            r = side[loop]["results"][method]
            assert r["finite"] and positive(r["first_call_in_process_s"]), (loop, method)
            check_summary(r["iteration"], f"{loop}/{method}/iteration")
            if loop != "compiled":
                check_summary(r["step"], f"{loop}/{method}/step")


def test_table_from_the_smoke_json(smoke):
    path, _, _ = smoke
    out = run(BENCH, "--table", "--json", str(path), timeout=60)
    assert "**Whole training iteration, ms (median)**" in out and "**Step time, ms (median)**" in out
    rows = [line for line in out.splitlines() if line.startswith("| tiny | ")]
    iteration_table = out.split("**Whole training iteration")[1].split("\n\n")[1]
    assert iteration_table.splitlines()[2].startswith("| tiny | default |")  # leads with the default loop
    assert any(line.startswith("| tiny | compiled |") for line in rows)
    assert "compiled loop (compile_train_step): first call ≤ no-step first call + 10 s (tiny)" in out
    assert "failed" not in out.split("**Targets, training loops**")[0]
    assert "**Side by side, interleaved in one process, ms per step (median)** (cpu;" in out


def test_table_of_the_committed_results_still_reads():
    """The committed results (step-only and training loops) render with the current
    report code, every model and both loop models present."""
    out = run(BENCH, "--table", "--json", "benchmarks/results/cpu.json", timeout=60)
    for model in ("200x4M", "1000tiny"):
        assert f"| {model} |" in out
    assert "**Whole training iteration, ms (median)**" in out and "| 1000tiny | default |" in out


def test_plot_from_the_smoke_json(smoke, tmp_path):
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed (pip install matplotlib)")
    path, data, _ = smoke
    copy = tmp_path / "plotted.json"
    copy.write_text(json.dumps(data))
    run(BENCH, "--plot", "--json", str(copy), timeout=120)
    png = copy.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_profile_both_loops():
    out = run(BENCH, "--profile", "--models", "tiny", "--loop", "both", "--profile-steps", "20", "--quick")
    for loop in ("default", "kept"):
        assert f"loop {loop!r}" in out
    assert out.count("## cProfile of opt.step() only") == 4 and "## opt.step" in out
    assert "optimizer.py" in out or "npu_optim_compile" in out  # our step's own frames are profiled


def test_bench_grouping_smoke():
    out = run("benchmarks/bench_grouping.py", "lowered", "4")
    line = out.strip().splitlines()[-1]
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    assert fields["tensors"] == "4"
    assert float(fields["compile"].rstrip("s")) > 0 and float(fields["step_median"].rstrip("ms")) > 0
