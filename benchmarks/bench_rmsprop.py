#!/usr/bin/env python
"""Benchmarks of ``NpuFusedRMSprop`` against torch's RMSprop and the memory floor.

Run from the repository root (see ``benchmarks/README.md``)::

    python benchmarks/bench_rmsprop.py                 # full run (~20-30 min on 2 cores)
    python benchmarks/bench_rmsprop.py --quick --skip-torch-compile   # smoke run
    python benchmarks/bench_rmsprop.py --table         # Markdown tables from the JSON
    python benchmarks/bench_rmsprop.py --plot          # PNG from the JSON
    python benchmarks/bench_rmsprop.py --profile       # where our step spends its time

Every measurement runs in a subprocess of its own (a "worker"), with its own
``TORCHINDUCTOR_CACHE_DIR``: a fresh, empty directory for a *cold* first call, the same
directory again in a new process for a *warm* one. The parent only orchestrates, writes
the JSON after every worker (a partial run keeps what it measured) and draws the plot.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

# ----------------------------------------------------------------------------------
# Models: lists of (count, shape, dtype); options are RMSprop keyword options.
# ----------------------------------------------------------------------------------

MODELS: dict[str, dict] = {
    "10x4M": dict(
        desc="10 fp32 tensors, 4 M params",
        tensors=[(10, (400, 1000), "float32")],
        options={},
    ),
    "200x4M": dict(
        desc="200 fp32 tensors, 4 M params",
        tensors=[(200, (100, 200), "float32")],
        options={},
    ),
    "1000x4M": dict(
        desc="1000 fp32 tensors, 4 M params",
        tensors=[(1000, (40, 100), "float32")],
        options={},
    ),
    "1000tiny": dict(
        desc="1000 fp32 tensors of 100 elements (0.1 M params)",
        tensors=[(1000, (100,), "float32")],
        options={},
    ),
    "20x50M": dict(
        desc="20 fp32 tensors, 50 M params",
        tensors=[(20, (1250, 2000), "float32")],
        options={},
    ),
    "mixed": dict(
        desc="100 fp32 + 100 bf16 tensors, 4 M params",
        tensors=[(100, (100, 200), "float32"), (100, (100, 200), "bfloat16")],
        options={},
    ),
    "centered_mom": dict(
        desc="200 fp32 tensors, 4 M params, centered, momentum 0.9",
        tensors=[(200, (100, 200), "float32")],
        options=dict(centered=True, momentum=0.9),
    ),
}
DEFAULT_MODELS = ["200x4M", "1000tiny", "10x4M", "1000x4M", "centered_mom", "mixed", "20x50M"]

#: Bytes an fp32 RMSprop step must move per parameter (read p, g, v; write p, v),
#: plus 8 (read + write) for each of grad_avg and momentum_buffer.
def bytes_per_param_fp32(options: dict) -> int:
    return 20 + 8 * bool(options.get("centered")) + 8 * (options.get("momentum", 0) > 0)


ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_numel(spec: dict) -> int:
    return sum(count * math.prod(shape) for count, shape, _ in spec["tensors"])


def model_tensor_count(spec: dict) -> int:
    return sum(count for count, _, _ in spec["tensors"])


def floor_bytes(spec: dict) -> int:
    per = bytes_per_param_fp32(spec["options"])
    return sum(
        count * math.prod(shape) * per * ELEMENT_SIZE[dtype] // 4
        for count, shape, dtype in spec["tensors"]
    )


# ----------------------------------------------------------------------------------
# Worker side: everything below that imports torch runs only in a worker process.
# ----------------------------------------------------------------------------------


class Settings:
    def __init__(self, quick: bool, device: str):
        self.device = device
        if quick:
            self.warmup, self.min_repeats, self.max_repeats, self.budget_s = 2, 5, 200, 0.4
            self.triad_numel = 1 << 24
        else:
            self.warmup, self.min_repeats, self.max_repeats, self.budget_s = 5, 25, 1000, 2.5
            self.triad_numel = 1 << 25  # 3 x 128 MiB fp32, far beyond any CPU cache
        if device == "cuda":
            self.triad_numel = 1 << 28  # 3 x 1 GiB


def _sync(device: str):
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def summarize(times: list[float]) -> dict:
    times_sorted = sorted(times)
    n = len(times_sorted)
    q = statistics.quantiles(times_sorted, n=4) if n >= 2 else [times_sorted[0]] * 3
    return {
        "median_s": statistics.median(times_sorted),
        "p25_s": q[0],
        "p75_s": q[2],
        "min_s": times_sorted[0],
        "n": n,
    }


def time_steps(step, st: Settings, before=None, warmup: int | None = None) -> dict:
    """Median (and quartiles) of ``step()`` alone, after ``warmup`` untimed calls.

    ``before()`` runs untimed before every call (e.g. to allocate fresh grads).
    Repeats until both ``min_repeats`` and ``budget_s`` are reached (or ``max_repeats``).
    """
    sync = _sync(st.device)
    for _ in range(st.warmup if warmup is None else warmup):
        if before is not None:
            before()
        step()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < st.max_repeats and (
        len(times) < st.min_repeats or time.perf_counter() - start < st.budget_s
    ):
        if before is not None:
            before()
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def make_model(spec: dict, device: str, seed: int = 0):
    """Params with random grads (kept, as zero_grad(set_to_none=False) keeps them)."""
    import torch

    torch.manual_seed(seed)
    params = []
    for count, shape, dtype in spec["tensors"]:
        dt = getattr(torch, dtype)
        for _ in range(count):
            p = (torch.randn(shape, device=device) * 0.02).to(dt).requires_grad_()
            p.grad = torch.randn(shape, device=device).to(dt)
            params.append(p)
    return params


def measure_triad(st: Settings) -> dict:
    """STREAM-like triad a = b + s*c on buffers far larger than the caches.

    Bytes counted as STREAM does: 3 arrays x element size (no write-allocate traffic).
    """
    import torch

    n = st.triad_numel
    a = torch.empty(n, device=st.device)
    b = torch.rand(n, device=st.device)
    c = torch.rand(n, device=st.device)
    r = time_steps(lambda: torch.add(b, c, alpha=3.0, out=a), st, warmup=3)
    r["bytes"] = 3 * n * 4
    r["bandwidth_GBps"] = r["bytes"] / r["median_s"] / 1e9
    r["numel"] = n
    # The read-modify-write form b += s*c (RMSprop's own access pattern: no
    # write-allocate traffic), bytes counted the same way (3 x n x 4).
    ri = time_steps(lambda: b.add_(c, alpha=1e-3), st, warmup=3)
    r["inplace"] = ri
    r["inplace_bandwidth_GBps"] = r["bytes"] / ri["median_s"] / 1e9
    return r


def _storage_bytes(tensors) -> int:
    seen: dict[tuple, int] = {}
    for t in tensors:
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def persistent_bytes(opt, params) -> int:
    """Bytes of every distinct storage held by params, grads and optimizer state."""
    import torch

    ts = list(params) + [p.grad for p in params if p.grad is not None]
    for state in opt.state.values():
        ts += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _storage_bytes(ts)


def peak_temporary_bytes(fn, device: str) -> dict:
    """Largest net allocation above the starting point while ``fn()`` runs.

    CPU: allocation/free events of the c10 CPU allocator recorded by torch.profiler
    (profile_memory=True), summed in time order. CUDA: the caching allocator's stats.
    """
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {
            "peak_bytes": torch.cuda.max_memory_allocated() - before,
            "net_bytes": torch.cuda.memory_allocated() - before,
        }
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    total = peak = 0
    for e in events:
        total += e.nbytes()
        peak = max(peak, total)
    return {"peak_bytes": peak, "net_bytes": total, "events": len(events)}


def make_flat_step(centered: bool, use_momentum: bool):
    """The practical best: one hand-written fused kernel over one flat buffer per role
    (per dtype), hyperparameters in 0-d tensors, compiled by inductor."""
    import torch

    def one(p, g, v, ga, b, lr, alpha, eps, mom):
        gf = g.float()
        vf = v.float() * alpha + (1 - alpha) * gf * gf
        v.copy_(vf)
        if centered:
            gaf = ga.float() + (1 - alpha) * (gf - ga.float())
            ga.copy_(gaf)
            d = (vf - gaf * gaf).sqrt() + eps
        else:
            d = vf.sqrt() + eps
        if use_momentum:
            bf = b.float() * mom + gf / d
            b.copy_(bf)
            p.copy_(p.float() - lr * bf)
        else:
            p.copy_(p.float() - lr * gf / d)

    def step(buffers, lr, alpha, eps, mom):
        for p, g, v, ga, b in buffers:
            one(p, g, v, ga, b, lr, alpha, eps, mom)

    return torch.compile(step, fullgraph=True, dynamic=False)


def flat_buffers(params, options):
    """One flat buffer per role and dtype, filled from the params and grads."""
    import torch

    by_dtype: dict = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    out = []
    for ps in by_dtype.values():
        p = torch.cat([q.detach().reshape(-1) for q in ps])
        g = torch.cat([q.grad.reshape(-1) for q in ps])
        v = torch.zeros_like(p)
        ga = torch.zeros_like(p) if options.get("centered") else None
        b = torch.zeros_like(p) if options.get("momentum", 0) > 0 else None
        out.append((p, g, v, ga, b))
    return out


def _hyper(device):
    import torch

    def t(x):
        return torch.tensor(x, device=device)

    return t


def worker_baseline(spec: dict, st: Settings) -> dict:
    """Triad, torch.optim.RMSprop (for-loop and foreach), the flat fused kernel, and
    torch's memory: all in one process, side by side."""
    import torch

    opts = spec["options"]
    out: dict = {"triad": measure_triad(st)}
    for name, foreach in (("for_loop", False), ("foreach", True)):
        params = make_model(spec, st.device)
        opt = torch.optim.RMSprop(params, lr=1e-2, foreach=foreach, **opts)
        out[name] = time_steps(opt.step, st)
        out[name]["persistent_bytes"] = persistent_bytes(opt, params)
        out[name]["step_memory"] = peak_temporary_bytes(opt.step, st.device)
        del opt, params
    # one fused flat kernel (cold compile: this worker has a fresh inductor cache dir)
    params = make_model(spec, st.device)
    bufs = flat_buffers(params, opts)
    del params
    t = _hyper(st.device)
    hyper = (t(1e-2), t(0.99), t(1e-8), t(float(opts.get("momentum", 0.0))))
    fn = make_flat_step(bool(opts.get("centered")), opts.get("momentum", 0) > 0)
    sync = _sync(st.device)
    t0 = time.perf_counter()
    fn(bufs, *hyper)
    sync()
    first = time.perf_counter() - t0
    out["flat_kernel"] = time_steps(lambda: fn(bufs, *hyper), st)
    out["flat_kernel"]["first_call_s"] = first
    out["flat_kernel"]["step_memory"] = peak_temporary_bytes(lambda: fn(bufs, *hyper), st.device)
    out["triad_after"] = measure_triad(st)
    return out


def worker_ours(spec: dict, st: Settings, phase: str) -> dict:
    """NpuFusedRMSprop(backend="inductor"): first call (cold or warm), steady step, and
    (warm phase) the step with grads freshly allocated before every step."""
    import torch

    from npu_optim_compile import NpuFusedRMSprop
    from npu_optim_compile import _compile

    params = make_model(spec, st.device)
    opt = NpuFusedRMSprop(params, lr=1e-2, backend="inductor", **spec["options"])
    sync = _sync(st.device)
    firsts = []
    for _ in range(3):
        t0 = time.perf_counter()
        opt.step()
        sync()
        firsts.append(time.perf_counter() - t0)
    out: dict = {"first_call_s": firsts[0], "first_calls_s": firsts}
    if phase == "warm":  # a triad beside our step, for the run's bandwidth median
        out["triad"] = measure_triad(st)
    out["step"] = time_steps(opt.step, st)
    out["compile_counts"] = {k.name(): v for k, v in _compile.compile_counts().items()}
    out["buckets"] = [
        {"numel": b.param.numel(), "dtype": str(b.param.dtype), "bytes": b.param.numel() * b.param.element_size()}
        for layout in opt._layouts.values()
        for b in layout.buckets
    ]
    if phase == "warm":
        sources = [p.grad.clone() for p in params]

        def fresh_grads():
            for p, g in zip(params, sources):
                p.grad = g.clone()

        out["fresh_grads"] = time_steps(opt.step, st, before=fresh_grads)
    return out


def worker_ours_mem(spec: dict, st: Settings) -> dict:
    """Memory of NpuFusedRMSprop (warm cache): first step (gathers into flat buffers),
    steady step, step with fresh grads; persistent bytes after a step."""
    import torch

    from npu_optim_compile import NpuFusedRMSprop

    params = make_model(spec, st.device)
    opt = NpuFusedRMSprop(params, lr=1e-2, backend="inductor", **spec["options"])
    # Compile first (so compile-time allocations do not count), on a throwaway copy.
    warm_params = make_model(spec, st.device)
    NpuFusedRMSprop(warm_params, lr=1e-2, backend="inductor", **spec["options"]).step()
    del warm_params
    out: dict = {"persistent_bytes_before": persistent_bytes(opt, params)}
    out["first_step_memory"] = peak_temporary_bytes(opt.step, st.device)
    opt.step()
    out["persistent_bytes"] = persistent_bytes(opt, params)
    out["step_memory"] = peak_temporary_bytes(opt.step, st.device)
    sources = [p.grad.clone() for p in params]
    for p, g in zip(params, sources):
        p.grad = g.clone()
    out["fresh_grads_step_memory"] = peak_temporary_bytes(opt.step, st.device)
    return out


def worker_torch_compile(spec: dict, st: Settings, phase: str) -> dict:
    """``torch.compile`` of torch.optim.RMSprop's step (foreach=True, tensor lr)."""
    import torch

    params = make_model(spec, st.device)
    opt = torch.optim.RMSprop(params, lr=torch.tensor(1e-2, device=st.device), foreach=True, **spec["options"])

    @torch.compile
    def step():
        opt.step()

    sync = _sync(st.device)
    firsts = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        sync()
        firsts.append(time.perf_counter() - t0)
    out: dict = {"first_call_s": firsts[0], "first_calls_s": firsts}
    out["step"] = time_steps(step, st)
    return out


def run_worker(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    st = Settings(args.quick, args.device)
    t0 = time.perf_counter()
    try:
        if args.task == "baseline":
            res = worker_baseline(spec, st)
        elif args.task == "ours":
            res = worker_ours(spec, st, args.phase)
        elif args.task == "ours_mem":
            res = worker_ours_mem(spec, st)
        elif args.task == "torch_compile":
            res = worker_torch_compile(spec, st, args.phase)
        else:
            raise ValueError(args.task)
    except Exception:
        res = {"error": traceback.format_exc()}
    res["worker_wall_s"] = time.perf_counter() - t0
    res["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------
# Parent side: orchestration, JSON, table, plot.
# ----------------------------------------------------------------------------------


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
    try:
        info["git_commit"] = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info


def spawn(task: str, model: str, cache_dir: str, args, phase: str = "", timeout: float = 1800) -> dict:
    """Run one worker in a fresh process with TORCHINDUCTOR_CACHE_DIR=cache_dir."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", task, "--model", model,
           "--result", result, "--device", args.device]
    if phase:
        cmd += ["--phase", phase]
    if args.quick:
        cmd.append("--quick")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    label = f"{model:>13} {task}{'/' + phase if phase else ''}"
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        try:
            res = json.loads(Path(result).read_text())
        except (OSError, json.JSONDecodeError):
            res = {"error": f"worker exited {proc.returncode}: {proc.stderr[-3000:]}"}
    except subprocess.TimeoutExpired:
        res = {"error": f"timeout after {timeout} s"}
    finally:
        Path(result).unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    status = "ERROR" if "error" in res else "ok"
    print(f"[{time.strftime('%H:%M:%S')}] {label} {status} ({wall:.1f} s)", flush=True)
    if "error" in res:
        print(res["error"], flush=True)
    return res


def run_all(args) -> Path:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; nothing to measure (skipped).")
        sys.exit(0)
    out_path = Path(args.json) if args.json else RESULTS / f"{args.device}{'_quick' if args.quick else ''}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",") if args.models else DEFAULT_MODELS
    for m in models:
        if m not in MODELS:
            sys.exit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    data = {
        "machine": machine_info(args.device),
        "config": {
            "quick": args.quick,
            "skip_torch_compile": args.skip_torch_compile,
            "settings": vars(Settings(args.quick, args.device)),
            "command": " ".join([Path(sys.executable).name] + sys.argv),
        },
        "models": {},
    }
    t_start = time.perf_counter()
    for m in models:
        spec = MODELS[m]
        entry = {
            "desc": spec["desc"],
            "tensors": model_tensor_count(spec),
            "numel": model_numel(spec),
            "options": spec["options"],
            "floor_bytes": floor_bytes(spec),
        }
        data["models"][m] = entry
        dirs = {k: tempfile.mkdtemp(prefix=f"bench_{k}_") for k in ("flat", "ours")}
        try:
            entry["baseline"] = spawn("baseline", m, dirs["flat"], args)
            _save(out_path, data)
            entry["ours_cold"] = spawn("ours", m, dirs["ours"], args, phase="cold")
            entry["ours_warm"] = spawn("ours", m, dirs["ours"], args, phase="warm")
            entry["ours_mem"] = spawn("ours_mem", m, dirs["ours"], args)
            _save(out_path, data)
        finally:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
    # torch.compile(opt.step) last, smallest compile first: its cold compiles take
    # minutes, and a run cut short keeps every other figure.
    if not args.skip_torch_compile:
        tc_models = args.tc_models.split(",") if args.tc_models else models
        for m in sorted((m for m in models if m in tc_models), key=lambda m: model_tensor_count(MODELS[m])):
            entry = data["models"][m]
            tc_dir = tempfile.mkdtemp(prefix="bench_tc_")
            try:
                entry["tc_cold"] = spawn("torch_compile", m, tc_dir, args, phase="cold")
                _save(out_path, data)
                entry["tc_warm"] = spawn("torch_compile", m, tc_dir, args, phase="warm")
                _save(out_path, data)
            finally:
                shutil.rmtree(tc_dir, ignore_errors=True)
    data["config"]["total_wall_s"] = time.perf_counter() - t_start
    _save(out_path, data)
    print(f"wrote {out_path}")
    return out_path


def _save(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")


# ---- derived figures ---------------------------------------------------------------


def _get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def bandwidth(data: dict, key: str = "bandwidth_GBps") -> float | None:
    """Median of every triad measured in the run (three per model), in bytes/s."""
    bws = []
    for e in data["models"].values():
        for where, k in (("baseline", "triad"), ("baseline", "triad_after"), ("ours_warm", "triad")):
            if key == "best_bandwidth_GBps":  # from the fastest triad, not the median
                t, b = _get(e, where, k, "min_s"), _get(e, where, k, "bytes")
                bw = b / t / 1e9 if t and b else None
            else:
                bw = _get(e, where, k, key)
            if bw:
                bws.append(bw * 1e9)
    return statistics.median(bws) if bws else None


STEP_PATHS = {
    "flat_kernel": ("baseline", "flat_kernel"),
    "ours": ("ours_warm", "step"),
    "ours_fresh_grads": ("ours_warm", "fresh_grads"),
    "torch_compile": ("tc_warm", "step"),
    "foreach": ("baseline", "foreach"),
    "for_loop": ("baseline", "for_loop"),
}


def step_stat(data: dict, stat: str) -> dict:
    """Per model and method: one statistic of the step times (``min_s``, ``p25_s``...)."""
    return {
        m: {k: _get(e, *path, stat) for k, path in STEP_PATHS.items()}
        for m, e in data["models"].items()
    }


def figures(data: dict, stat: str = "median_s") -> dict:
    """Per model: step times (s, ``stat`` of the repeats: the median, or ``min_s`` with
    the floor from the fastest triads) per method, floor, first calls, memory."""
    bw = bandwidth(data, "best_bandwidth_GBps" if stat == "min_s" else "bandwidth_GBps")
    bwi = bandwidth(data, "inplace_bandwidth_GBps")
    steps = step_stat(data, stat)
    out = {}
    for m, e in data["models"].items():
        f = {
            "floor": e["floor_bytes"] / bw if bw else None,
            "floor_inplace": e["floor_bytes"] / bwi if bwi else None,
            **steps[m],
            "ours_cold_first": _get(e, "ours_cold", "first_call_s"),
            "ours_warm_first": _get(e, "ours_warm", "first_call_s"),
            "tc_cold_first": _get(e, "tc_cold", "first_call_s"),
            "tc_warm_first": _get(e, "tc_warm", "first_call_s"),
            "tc_cold_calls": _get(e, "tc_cold", "first_calls_s"),
            "flat_cold_first": _get(e, "baseline", "flat_kernel", "first_call_s"),
            "torch_persistent": _get(e, "baseline", "for_loop", "persistent_bytes"),
            "torch_peak_tmp": _get(e, "baseline", "for_loop", "step_memory", "peak_bytes"),
            "foreach_peak_tmp": _get(e, "baseline", "foreach", "step_memory", "peak_bytes"),
            "ours_persistent": _get(e, "ours_mem", "persistent_bytes"),
            "ours_peak_tmp": _get(e, "ours_mem", "step_memory", "peak_bytes"),
            "ours_fresh_peak_tmp": _get(e, "ours_mem", "fresh_grads_step_memory", "peak_bytes"),
            "ours_first_peak_tmp": _get(e, "ours_mem", "first_step_memory", "peak_bytes"),
            "bucket_bytes": max((b["bytes"] for b in _get(e, "ours_warm", "buckets") or []), default=None),
        }
        out[m] = f
    return out


def _ms(x):
    return "–" if x is None else (f"{x * 1e3:.3g}" if x * 1e3 < 100 else f"{x * 1e3:.0f}")


def _s(x):
    return "–" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _x(r):
    return "–" if r is None else f"{r:.2f}×"


def _mb(b):
    return "–" if b is None else f"{b / 2**20:.1f}"


def targets(data: dict, stat: str = "median_s") -> list[tuple[str, str, bool | None]]:
    fig = figures(data, stat)
    rows: list[tuple[str, str, bool | None]] = []

    def ok(cond):
        return None if cond is None else bool(cond)

    for m, f in fig.items():
        if data["models"][m]["numel"] >= 4_000_000:
            r = _ratio(f["ours"], f["floor"])
            rows.append((f"step ≤ 1.25× floor ({m})", _x(r), ok(r is not None and r <= 1.25) if r else None))
    f = fig.get("200x4M")
    if f:
        r = _ratio(f["foreach"], f["ours"])
        rf = _ratio(f["foreach"], f["flat_kernel"])
        rows.append(("≥ 8× faster than foreach=True (200x4M)", f"{_x(r)} (flat kernel: {_x(rf)})", ok(r and r >= 8)))
        r = _ratio(f["torch_compile"], f["ours"])
        rf = _ratio(f["torch_compile"], f["flat_kernel"])
        rows.append(("≥ 2.5× faster than torch.compile(opt.step) (200x4M)", f"{_x(r)} (flat kernel: {_x(rf)})", ok(r and r >= 2.5) if r else None))
    for m in ("1000x4M", "1000tiny"):
        if m in fig and fig[m]["ours_cold_first"] is not None:
            c = fig[m]["ours_cold_first"]
            rows.append((f"cold first call ≤ 3 s ({m})", f"{c:.2f} s", c <= 3))
    if "10x4M" in fig and "1000x4M" in fig:
        a, b = fig["10x4M"]["ours_cold_first"], fig["1000x4M"]["ours_cold_first"]
        if a and b:
            g = b / a - 1
            rows.append(("cold first call grows < 50 % from 10 to 1000 tensors", f"{a:.2f} s → {b:.2f} s ({g:+.0%})", g < 0.5))
    f = fig.get("1000tiny")
    if f:
        r = _ratio(f["foreach"], f["ours"])
        rf = _ratio(f["foreach"], f["flat_kernel"])
        rows.append(("1000 tiny tensors ≥ 20× faster than foreach=True", f"{_x(r)} (flat kernel: {_x(rf)})", ok(r and r >= 20)))
    for m, f in fig.items():
        if f["ours_persistent"] is not None and f["torch_persistent"] is not None:
            rows.append((f"persistent memory ≤ torch.optim.RMSprop's ({m})",
                         f"{_mb(f['ours_persistent'])} vs {_mb(f['torch_persistent'])} MiB",
                         f["ours_persistent"] <= f["torch_persistent"]))
        if None not in (f["ours_peak_tmp"], f["torch_peak_tmp"], f["bucket_bytes"], f["ours_persistent"], f["torch_persistent"]):
            ours_peak = f["ours_persistent"] + f["ours_peak_tmp"]
            torch_peak = f["torch_persistent"] + f["torch_peak_tmp"]
            rows.append((f"step peak ≤ torch's + one bucket ({m})",
                         f"{_mb(ours_peak)} vs {_mb(torch_peak)} + {_mb(f['bucket_bytes'])} MiB",
                         ours_peak <= torch_peak + f["bucket_bytes"]))
    return rows


def table(data: dict) -> str:
    fig = figures(data)
    mi = data["machine"]
    bw = bandwidth(data)
    lines = [
        f"Run of {mi['date']} on {mi['cpu_model']} ({mi['cpu_count']} cores, torch {mi['torch']}, "
        f"{mi['torch_threads']} threads){', quick mode' if data['config'].get('quick') else ''}. "
        f"Triad bandwidth (median of the run): {bw / 1e9:.1f} GB/s; in-place triad "
        f"{(bandwidth(data, 'inplace_bandwidth_GBps') or 0) / 1e9:.1f} GB/s." if bw else "",
        "",
        "**Step time, ms (median)**",
        "",
        "| model | floor | flat kernel | ours | ours, fresh grads | torch.compile | foreach=True | foreach=False |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        lines.append(
            f"| {m} | {_ms(f['floor'])} | {_ms(f['flat_kernel'])} | **{_ms(f['ours'])}** | {_ms(f['ours_fresh_grads'])} | "
            f"{_ms(f['torch_compile'])} | {_ms(f['foreach'])} | {_ms(f['for_loop'])} |"
        )
    mins = step_stat(data, "min_s")
    lines += [
        "",
        "**Step time, ms (minimum of the repeats)**: the fastest single step, an estimate of the "
        "step on a quiet machine (the medians above include waits for a descheduled thread)",
        "",
        "| model | floor (best triad) | flat kernel | ours | ours, fresh grads | torch.compile | foreach=True | foreach=False |",
        "|---|---|---|---|---|---|---|---|",
    ]
    best_bw = bandwidth(data, "best_bandwidth_GBps")
    for m, f in mins.items():
        fl = data["models"][m]["floor_bytes"] / best_bw if best_bw else None
        lines.append(
            f"| {m} | {_ms(fl)} | {_ms(f['flat_kernel'])} | **{_ms(f['ours'])}** | {_ms(f['ours_fresh_grads'])} | "
            f"{_ms(f['torch_compile'])} | {_ms(f['foreach'])} | {_ms(f['for_loop'])} |"
        )
    lines += [
        "",
        "**Ratios** (ours / floor: lower is better, 1.00× is the floor; the others are speed-ups of ours, higher is better)",
        "",
        "| model | ours / floor | ours / in-place floor | flat kernel / floor | foreach=True / ours | foreach=False / ours | torch.compile / ours | ours / flat kernel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        lines.append(
            f"| {m} | {_x(_ratio(f['ours'], f['floor']))} | {_x(_ratio(f['ours'], f['floor_inplace']))} | "
            f"{_x(_ratio(f['flat_kernel'], f['floor']))} | "
            f"{_x(_ratio(f['foreach'], f['ours']))} | {_x(_ratio(f['for_loop'], f['ours']))} | "
            f"{_x(_ratio(f['torch_compile'], f['ours']))} | {_x(_ratio(f['ours'], f['flat_kernel']))} |"
        )
    lines += [
        "",
        "**First call, s** (cold: fresh process, empty inductor cache; warm: fresh process, cache filled by the cold run)",
        "",
        "| model | ours cold | ours warm | torch.compile cold | torch.compile warm | torch.compile cold, calls 2+3 | flat kernel cold |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        calls = f["tc_cold_calls"]
        lines.append(
            f"| {m} | {_s(f['ours_cold_first'])} | {_s(f['ours_warm_first'])} | {_s(f['tc_cold_first'])} | "
            f"{_s(f['tc_warm_first'])} | {_s(sum(calls[1:]) if calls else None)} | {_s(f['flat_cold_first'])} |"
        )
    lines += [
        "",
        "**Memory, MiB** (persistent: distinct storages of params + grads + state after a step; "
        "temporaries: peak net allocation during one step)",
        "",
        "| model | persistent torch | persistent ours | temporaries foreach=False | temporaries foreach=True | "
        "temporaries ours | ours, fresh grads | ours, first step | largest bucket |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        lines.append(
            f"| {m} | {_mb(f['torch_persistent'])} | {_mb(f['ours_persistent'])} | {_mb(f['torch_peak_tmp'])} | "
            f"{_mb(f['foreach_peak_tmp'])} | {_mb(f['ours_peak_tmp'])} | {_mb(f['ours_fresh_peak_tmp'])} | "
            f"{_mb(f['ours_first_peak_tmp'])} | {_mb(f['bucket_bytes'])} |"
        )
    lines += [
        "",
        "**Targets** (from the medians; the last two columns redo the step-time targets with the "
        "fastest step of each method and the fastest triad)",
        "",
        "| target | measured | met | fastest steps | met |",
        "|---|---|---|---|---|",
    ]

    def yn(met):
        return "–" if met is None else ("yes" if met else "**no**")

    for (name, value, met), (_, v2, met2) in zip(targets(data), targets(data, "min_s")):
        same = "first call" in name or "memory" in name or "peak" in name
        lines.append(f"| {name} | {value} | {yn(met)} | {'' if same else v2} | {'' if same else yn(met2)} |")
    errors = [
        f"{m}/{k}" for m, e in data["models"].items() for k, v in e.items() if isinstance(v, dict) and "error" in v
    ]
    if errors:
        lines += ["", "Workers that failed: " + ", ".join(errors)]
    return "\n".join(lines)


METHODS = [
    ("flat_kernel", "one fused flat kernel", "#7f7f7f"),
    ("ours", "ours (NpuFusedRMSprop)", "#d62728"),
    ("ours_fresh_grads", "ours, fresh grads", "#ff9896"),
    ("torch_compile", "torch.compile(opt.step)", "#1f77b4"),
    ("foreach", "torch RMSprop foreach=True", "#2ca02c"),
    ("for_loop", "torch RMSprop foreach=False", "#98df8a"),
]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig_data = figures(data)
    models = list(fig_data)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 10), gridspec_kw={"height_ratios": [3, 2]})
    width = 0.8 / len(METHODS)
    mins = step_stat(data, "min_s")
    for i, (key, label, color) in enumerate(METHODS):
        xs, ys, mx, my = [], [], [], []
        for j, m in enumerate(models):
            v = fig_data[m][key]
            if v:
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(v * 1e3)
            if mins[m][key]:
                mx.append(j - 0.4 + (i + 0.5) * width)
                my.append(mins[m][key] * 1e3)
        ax.bar(xs, ys, width, label=label, color=color)
        ax.scatter(mx, my, marker="_", color="black", s=40, zorder=3,
                   label="fastest single step" if i == 0 else None)
    for j, m in enumerate(models):
        fl = fig_data[m]["floor"]
        if fl:
            ax.hlines(fl * 1e3, j - 0.45, j + 0.45, colors="black", linewidth=2,
                      label="memory floor (bytes / triad bandwidth)" if j == 0 else None)
    ax.set_yscale("log")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{m}\n{data['models'][m]['tensors']} tensors" for m in models])
    ax.set_ylabel("step time, ms (bars: median; dashes: fastest step; log scale)")
    mi = data["machine"]
    ax.set_title(f"RMSprop step, {mi['device']}: {mi['cpu_model'] if mi['device'] == 'cpu' else mi.get('gpu')}, "
                 f"{mi['cpu_count']} cores, {mi['torch_threads']} threads, torch {mi['torch']}, {mi['date'][:10]}")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)

    first = [
        ("ours_cold_first", "ours, cold", "#d62728"),
        ("ours_warm_first", "ours, warm", "#ff9896"),
        ("flat_cold_first", "flat kernel, cold", "#7f7f7f"),
        ("tc_cold_first", "torch.compile, cold", "#1f77b4"),
        ("tc_warm_first", "torch.compile, warm", "#aec7e8"),
    ]
    width = 0.8 / len(first)
    for i, (key, label, color) in enumerate(first):
        xs, ys = [], []
        for j, m in enumerate(models):
            v = fig_data[m][key]
            if v:
                xs.append(j - 0.4 + (i + 0.5) * width)
                ys.append(v)
        ax2.bar(xs, ys, width, label=label, color=color)
    ax2.set_yscale("log")
    ax2.set_xticks(range(len(models)))
    ax2.set_xticklabels(models)
    ax2.set_ylabel("first call, s (log scale)")
    ax2.legend(fontsize=8, ncol=3)
    ax2.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


# ---- profile of our step ------------------------------------------------------------


def profile_ours(args) -> None:
    """Where one NpuFusedRMSprop step spends its time (1000 tiny tensors by default)."""
    import cProfile
    import io
    import pstats

    import torch

    from npu_optim_compile import NpuFusedRMSprop
    from npu_optim_compile._compile import StepKey, get_bucket_step

    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.models or "1000tiny"
    spec = MODELS[model]
    st = Settings(args.quick, args.device)
    lines = [
        f"# Profile of NpuFusedRMSprop.step, model {model} ({spec['desc']})",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
        f"TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}",
        "",
    ]
    params = make_model(spec, args.device)
    opt = NpuFusedRMSprop(params, lr=1e-2, backend="inductor", **spec["options"])
    opt.step()
    full = time_steps(opt.step, st)

    # the compiled bucket kernel alone, called with the same flat tensors
    group = opt.param_groups[0]
    layout = opt._layouts[0]
    bucket = layout.buckets[0]
    roles = layout.roles
    key = StepKey("inductor", args.device, bucket.math_dtype, bool(group["centered"]),
                  group["momentum"] > 0, False, False)
    fn = get_bucket_step(key)
    tensors = bucket.math_tensors(roles)
    hyper = opt._hyper[(0, bucket.device)].tensors
    call_args = tensors[:3] + [None, None] + list(hyper)
    kernel = time_steps(lambda: fn(*call_args), st)

    # the same with the eager backend (flat buffers, no compile)
    params_e = make_model(spec, args.device)
    opt_e = NpuFusedRMSprop(params_e, lr=1e-2, backend="eager", **spec["options"])
    opt_e.step()
    eager = time_steps(opt_e.step, st)

    # the flat kernel of the baseline
    bufs = flat_buffers(make_model(spec, args.device), spec["options"])
    t = _hyper(args.device)
    h = (t(1e-2), t(0.99), t(1e-8), t(0.0))
    flat = make_flat_step(False, False)
    flat(bufs, *h)
    flat_t = time_steps(lambda: flat(bufs, *h), st)

    rows = [
        ("NpuFusedRMSprop.step() (inductor)", full),
        ("its compiled bucket step called directly (torch.compile wrapper + guards + kernel)", kernel),
        ("NpuFusedRMSprop.step() with backend='eager'", eager),
        ("hand-written flat kernel (torch.compile, static shapes)", flat_t),
    ]
    lines += ["| what | median µs | p25 µs | p75 µs | fastest µs | steps |", "|---|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['median_s'] * 1e6:.0f} | {r['p25_s'] * 1e6:.0f} | {r['p75_s'] * 1e6:.0f} | "
            f"{r['min_s'] * 1e6:.0f} | {r['n']} |"
        )
    lines.append("")

    n = 2000
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        opt.step()
    pr.disable()
    s = io.StringIO()
    ps = pstats.Stats(pr, stream=s)
    ps.sort_stats("tottime").print_stats(25)
    lines += [f"## cProfile, {n} steps, sorted by tottime (top 25)", "", "```", s.getvalue().strip(), "```", ""]
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(25)
    lines += [f"## cProfile, sorted by cumulative time (top 25)", "", "```", s.getvalue().strip(), "```", ""]

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(200):
            opt.step()
    lines += ["## torch.profiler, 200 steps, sorted by self CPU time", "", "```",
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), "```"]
    text = "\n".join(lines)
    print(text)
    suffix = f"_{args.threads}thread" if args.threads else ""
    out = RESULTS / f"profile_ours_{model}_{args.device}{suffix}.md"
    out.write_text(text + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--quick", action="store_true", help="few repeats: a smoke run")
    ap.add_argument("--models", help=f"comma-separated, from: {', '.join(MODELS)} (default: all)")
    ap.add_argument("--skip-torch-compile", action="store_true", help="skip torch.compile(opt.step) (slow to compile)")
    ap.add_argument("--tc-models", help="comma-separated models that also get torch.compile(opt.step) (default: all selected)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads in every worker (default: torch's)")
    ap.add_argument("--json", help="results JSON path (default benchmarks/results/<device>[_quick].json)")
    ap.add_argument("--table", action="store_true", help="print the Markdown tables from the JSON and exit")
    ap.add_argument("--plot", action="store_true", help="draw the PNG from the JSON and exit")
    ap.add_argument("--profile", action="store_true", help="profile our step (model from --models, default 1000tiny)")
    # worker mode (internal)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.task = args.worker
        run_worker(args)
        return
    default_json = RESULTS / f"{args.device}{'_quick' if args.quick else ''}.json"
    json_path = Path(args.json) if args.json else default_json
    if args.table or args.plot:
        data = json.loads(json_path.read_text())
        if args.table:
            print(table(data))
        if args.plot:
            plot(data, json_path.with_suffix(".png"))
        return
    if args.profile:
        if args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                print("--device cuda: CUDA is not available here; skipped.")
                return
        profile_ours(args)
        return
    path = run_all(args)
    data = json.loads(path.read_text())
    plot(data, path.with_suffix(".png"))
    print()
    print(table(data))


if __name__ == "__main__":
    main()
