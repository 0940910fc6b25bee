#!/usr/bin/env python
"""Benchmarks of ``NpuFusedRMSprop`` against torch's RMSprop and the memory floor.

Run from the repository root (see ``benchmarks/README.md``)::

    python benchmarks/bench_rmsprop.py                 # full run (an hour or more on 2 cores)
    python benchmarks/bench_rmsprop.py --quick --skip-torch-compile --models 200x4M,1000tiny
    python benchmarks/bench_rmsprop.py --table         # Markdown tables from the JSON
    python benchmarks/bench_rmsprop.py --plot          # PNG from the JSON
    python benchmarks/bench_rmsprop.py --profile --loop default   # where our step spends its time
    python benchmarks/bench_rmsprop.py --device cuda --side-by-side-only --quick   # on a GPU

Three kinds of measurements: one optimizer step on params with hand-set grads
("step-only", ``workers.py``), the same with every method in one process, timed
interleaved against a copy kernel's floor ("side by side", ``side_by_side.py``; CUDA
events on a GPU), and whole training iterations of a real network in three loops,
default / kept / compiled (``loops.py``). Every measurement runs in a subprocess
of its own (a "worker"), with its own ``TORCHINDUCTOR_CACHE_DIR``: a fresh, empty
directory for a *cold* first call, the same directory again in a new process for a
*warm* one. This file only orchestrates: it spawns the workers and writes the JSON
after every worker (a partial run keeps what it measured); ``report.py`` prints the
tables, ``plot.py`` draws the PNG, ``profile_step.py`` profiles our step.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # sibling modules import by plain name
    sys.path.insert(0, str(HERE))

from common import (  # noqa: E402
    COMPILED_LOOP_METHODS,
    DEFAULT_MODELS,
    EAGER_LOOP_METHODS,
    LOOP_LR,
    LOOP_METHODS,
    LOOPS,
    MODELS,
    RESULTS,
    STEP_LR,
    Settings,
    floor_bytes,
    is_torch_compile_baseline,
    largest_bucket_bytes,
    model_numel,
    model_tensor_count,
    net_summary,
)


def machine_info(device: str) -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device,
    }
    try:
        info["mem_total_GiB"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        info["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def spawn(task: str, model: str, cache_dir: str, args, *, phase: str = "", loop: str = "", method: str = "") -> dict:
    """Run one worker in a fresh process with TORCHINDUCTOR_CACHE_DIR=cache_dir.

    A worker that outlives ``--worker-timeout`` is killed (with everything it started)
    and recorded as ``{"error": ..., "timed_out": true}``; the run goes on.
    """
    cache = "warm" if any(Path(cache_dir).iterdir()) else "cold"
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    fd, result = tempfile.mkstemp(suffix=".json", prefix="bench_result_")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--model", model,
           "--result", result, "--device", args.device]
    for flag, value in (("--phase", phase), ("--loop", loop), ("--method", method)):
        if value:
            cmd += [flag, value]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    label = f"{model:>13} {task}" + "".join(f"/{v}" for v in (phase, loop, method) if v)
    print(f"[{time.strftime('%H:%M:%S')}] {label} ({cache} cache) ...", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

    def killed(signum, _frame):  # `timeout` or Ctrl-C ends the run: the worker (its own session) too
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, killed) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _, stderr = proc.communicate(timeout=args.worker_timeout)
        try:
            res = json.loads(Path(result).read_text())
        except (OSError, json.JSONDecodeError):
            res = {"error": f"worker exited {proc.returncode}: {stderr[-3000:]}"}
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: it and its children
        except ProcessLookupError:
            pass
        proc.communicate()
        res = {"error": f"timed out after {args.worker_timeout:g} s", "timed_out": True}
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        Path(result).unlink(missing_ok=True)
    res["cache"] = cache
    wall = time.perf_counter() - t0
    res.setdefault("worker_wall_s", wall)
    status = "TIMED OUT" if res.get("timed_out") else "ERROR" if "error" in res else "ok"
    print(f"[{time.strftime('%H:%M:%S')}] {label} {status} ({wall:.1f} s)", flush=True)
    if "error" in res and not res.get("timed_out"):
        print(res["error"], flush=True)
    return res


def _save(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


def _split(value: str | None, default, choices, what: str) -> list[str]:
    if not value:
        return list(default)
    if value == "none":
        return []
    items = [v.strip() for v in value.split(",") if v.strip()]
    for v in items:
        if v not in choices:
            sys.exit(f"unknown {what} {v!r}; choose from {', '.join(choices)}")
    return items


def torch_cache_dir() -> str:
    """The inductor cache directory torch itself would use in this environment."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return os.environ["TORCHINDUCTOR_CACHE_DIR"]
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except ImportError:  # moved in another torch: its formula in torch 2.13
        import getpass
        import re

        return os.path.join(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", getpass.getuser()))


class CacheDirs:
    """Inductor cache directories: a fresh one per measurement (removed afterwards), or
    the one ``--cache-dir`` shares between all workers (first calls then warm up)."""

    def __init__(self, shared: str | None):
        self.shared = torch_cache_dir() if shared == "default" else shared
        if self.shared:
            Path(self.shared).mkdir(parents=True, exist_ok=True)

    def new(self, prefix: str) -> str:
        return self.shared or tempfile.mkdtemp(prefix=f"bench_{prefix}_")

    def done(self, path: str) -> None:
        if path != self.shared:
            shutil.rmtree(path, ignore_errors=True)


def _compiles(loop: str, method: str) -> bool:
    return loop == "compiled" or method in ("ours", "tc_step")


def run_all(args) -> Path:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; nothing to measure (skipped).")
        sys.exit(0)
    out_path = Path(args.json) if args.json else RESULTS / f"{args.device}{'_quick' if args.quick else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    models = _split(args.models, DEFAULT_MODELS, list(MODELS), "model")
    loops = _split(args.loops, LOOPS, LOOPS, "loop")
    methods = _split(args.loop_methods, LOOP_METHODS, LOOP_METHODS, "loop method")
    tc_models = set(_split(args.tc_models, models, list(MODELS), "model"))

    def with_tc(m: str) -> bool:
        return not args.skip_torch_compile and m in tc_models

    caches = CacheDirs(args.cache_dir)
    data = {
        "machine": machine_info(args.device),
        "config": {
            "quick": args.quick,
            "skip_torch_compile": args.skip_torch_compile,
            "skip_step_only": args.skip_step_only,
            "side_by_side": not args.skip_side_by_side,
            "side_by_side_only": args.side_by_side_only,
            "loops_side": not args.skip_loops_side,
            "models": models,
            "loops": loops,
            "loop_methods": methods,
            "tc_models": sorted(tc_models),
            "step_lr": STEP_LR,
            "loop_lr": LOOP_LR,
            "worker_timeout_s": args.worker_timeout,
            "shared_cache_dir": bool(args.cache_dir),
            "settings": vars(Settings(args.quick, args.device)),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
        },
        "models": {},
    }
    t_start = time.perf_counter()

    def run_loop(m: str, loop: str, method: str) -> None:
        d = caches.new(f"{loop}_{method}")
        try:
            res = spawn("loop", m, d, args, loop=loop, method=method)
            data["models"][m]["loops"][loop][method] = res
            _save(out_path, data)
            if args.loop_warm and _compiles(loop, method) and "error" not in res:
                res["warm"] = spawn("loop", m, d, args, loop=loop, method=method)
                _save(out_path, data)
        finally:
            caches.done(d)

    slow: list[tuple] = []  # the torch.compile baselines: last, smallest first
    side_late: list[tuple] = []  # the interleaved loops: after every first call
    for m in models:
        spec = MODELS[m]
        entry = data["models"][m] = {
            "desc": spec["desc"],
            "tensors": model_tensor_count(spec),
            "numel": model_numel(spec),
            "options": spec["options"],
            "floor_bytes": floor_bytes(spec),
            "bucket_bytes": largest_bucket_bytes(spec),
        }
        if not args.skip_side_by_side:
            d = caches.new("side")
            try:
                entry["side_by_side"] = spawn("side_by_side", m, d, args, phase="with_tc" if with_tc(m) else "")
                _save(out_path, data)
            finally:
                caches.done(d)
        if args.side_by_side_only:
            continue
        if not args.skip_step_only:
            flat_dir, ours_dir = caches.new("flat"), caches.new("ours")
            try:
                entry["baseline"] = spawn("baseline", m, flat_dir, args)
                _save(out_path, data)
                entry["ours_cold"] = spawn("ours", m, ours_dir, args, phase="cold")
                entry["ours_warm"] = spawn("ours", m, ours_dir, args, phase="warm")
                entry["ours_mem"] = spawn("ours_mem", m, ours_dir, args)
                _save(out_path, data)
            finally:
                caches.done(flat_dir)
                caches.done(ours_dir)
            if with_tc(m):
                slow.append((0, model_tensor_count(spec), m, "step", ""))
        if "net" in spec and loops:
            entry["net"] = net_summary(spec["net"])
            entry["loops"] = {loop: {} for loop in loops}
            for loop in loops:
                for method in COMPILED_LOOP_METHODS if loop == "compiled" else EAGER_LOOP_METHODS:
                    if method not in methods:
                        continue
                    if is_torch_compile_baseline(loop, method):
                        if with_tc(m):
                            slow.append((1 + (loop == "compiled"), entry["net"]["tensors"], m, loop, method))
                        continue
                    run_loop(m, loop, method)
            if not args.skip_loops_side:
                for loop in loops:  # the steady iterations, every method interleaved in one process
                    side = [k for k in (COMPILED_LOOP_METHODS if loop == "compiled" else EAGER_LOOP_METHODS)
                            if k in methods and (with_tc(m) or not is_torch_compile_baseline(loop, k))]
                    side_late.append((m, loop, side))
    for _, _, m, loop, method in sorted(slow):
        if loop == "step":  # torch.compile(opt.step) on hand-set grads, cold then warm
            entry = data["models"][m]
            d = caches.new("tc")
            try:
                entry["tc_cold"] = spawn("torch_compile", m, d, args, phase="cold")
                _save(out_path, data)
                entry["tc_warm"] = spawn("torch_compile", m, d, args, phase="warm")
                _save(out_path, data)
            finally:
                caches.done(d)
        else:
            run_loop(m, loop, method)
    for m, loop, side in side_late:
        d = caches.new(f"side_{loop}")
        try:
            data["models"][m].setdefault("loops_side", {})[loop] = spawn("loops_side", m, d, args, loop=loop,
                                                                      method=",".join(side))
            _save(out_path, data)
        finally:
            caches.done(d)
    data["config"]["total_wall_s"] = time.perf_counter() - t_start
    _save(out_path, data)
    print(f"wrote {out_path}")
    return out_path


def draw(data: dict, path: Path) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    from plot import plot

    plot(data, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run (writes <device>_quick.*)")
    ap.add_argument("--models", help=f"comma-separated, from: {', '.join(MODELS)} (default: all but tiny); "
                    "the loops run on those with a network: 200x4M, 1000tiny, tiny")
    ap.add_argument("--loops", help=f"training loops to measure, from: {', '.join(LOOPS)}, or none "
                    "(default: all three)")
    ap.add_argument("--loop-methods", help=f"methods of the loops, from: {', '.join(LOOP_METHODS)} "
                    "(default: all; ours_cts and no_step exist in the compiled loop only)")
    ap.add_argument("--skip-step-only", action="store_true",
                    help="skip the step-only measurements (hand-set grads): loops only")
    ap.add_argument("--skip-side-by-side", action="store_true",
                    help="skip the side-by-side step-only measurement (all methods in one process, "
                    "interleaved, against the copy floor)")
    ap.add_argument("--side-by-side-only", action="store_true",
                    help="only the side-by-side measurement: ours, foreach=True, capturable=True (CUDA), "
                    "torch.compile(opt.step) and the copy floor (what tools/gpu_check.sh runs)")
    ap.add_argument("--skip-torch-compile", action="store_true",
                    help="skip the slow torch.compile baselines: torch.compile(opt.step) (step-only and "
                    "eager loops) and torch.optim.RMSprop inside the compiled train step")
    ap.add_argument("--tc-models", help="comma-separated models that get those baselines (default: all selected)")
    ap.add_argument("--skip-loops-side", action="store_true",
                    help="skip the interleaved measurement of the loops (every method of a loop in one "
                    "process, taking turns; the tables' steady figures come from it when present)")
    ap.add_argument("--loop-warm", action="store_true",
                    help="also rerun every compiling loop measurement in a fresh process with its "
                    "filled cache (a warm first call)")
    ap.add_argument("--cache-dir", help="one inductor cache directory for every worker (default: a fresh, "
                    "empty one per measurement; 'default': torch's own, as TORCHINDUCTOR_CACHE_DIR or "
                    "torch's default gives it); the JSON records whether each first call found it empty "
                    "(cold) or not (warm)")
    ap.add_argument("--worker-timeout", type=float, default=1800.0,
                    help="seconds before a worker is killed and recorded as timed out (default 1800)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    ap.add_argument("--json", help="results JSON path (default benchmarks/results/<device>[_quick].json)")
    ap.add_argument("--table", action="store_true", help="print the Markdown tables from the JSON and exit")
    ap.add_argument("--plot", action="store_true", help="draw the PNG (next to the JSON) and exit")
    ap.add_argument("--profile", action="store_true",
                    help="profile NpuFusedRMSprop.step() in a training loop (model from --models, "
                    "default 1000tiny; loop from --loop)")
    ap.add_argument("--loop", choices=LOOPS + ("both",), default="default",
                    help="--profile: the loop to profile: default, kept or both (default: default)")
    ap.add_argument("--profile-steps", type=int, default=500, help="--profile: profiled steps (default 500)")
    ap.add_argument("--profile-out", help="--profile: also write the report to this Markdown file")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side_by_side_only and args.skip_side_by_side:
        ap.error("--side-by-side-only and --skip-side-by-side exclude each other")

    if args.worker:
        from workers import run_worker

        run_worker(args)
        return
    json_path = Path(args.json) if args.json else RESULTS / f"{args.device}{'_quick' if args.quick else ''}.json"
    if args.table or args.plot:
        data = json.loads(json_path.read_text())
        if args.table:
            from report import table

            print(table(data))
        if args.plot:
            draw(data, json_path.with_suffix(".png"))
        return
    if args.profile:
        from profile_step import profile_ours

        profile_ours(args)
        return
    path = run_all(args)
    data = json.loads(path.read_text())
    draw(data, path.with_suffix(".png"))
    print()
    from report import table

    print(table(data))


if __name__ == "__main__":
    main()
