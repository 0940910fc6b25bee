"""What runs inside a worker process: the step-only measurements (one RMSprop step on
params with hand-set grads) and the dispatch of every worker task.

The training-loop measurements are in ``loops.py``. A worker writes one JSON object
(its results, or ``{"error": ...}``) to the path the parent gave it.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from common import MODELS, STEP_LR, Settings, sync_fn, time_steps


def make_params(spec: dict, device: str, seed: int = 0):
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


def worker_baseline(spec: dict, st: Settings) -> dict:
    """Triad, torch.optim.RMSprop (for-loop and foreach), the flat fused kernel, and
    torch's memory: all in one process, side by side."""
    import torch

    opts = spec["options"]
    out: dict = {"triad": measure_triad(st)}
    for name, foreach in (("for_loop", False), ("foreach", True)):
        params = make_params(spec, st.device)
        opt = torch.optim.RMSprop(params, lr=STEP_LR, foreach=foreach, **opts)
        out[name] = time_steps(opt.step, st)
        out[name]["persistent_bytes"] = persistent_bytes(opt, params)
        out[name]["step_memory"] = peak_temporary_bytes(opt.step, st.device)
        del opt, params
    # one fused flat kernel (cold compile: this worker has a fresh inductor cache dir)
    params = make_params(spec, st.device)
    bufs = flat_buffers(params, opts)
    del params

    def t(x):
        return torch.tensor(x, device=st.device)

    hyper = (t(STEP_LR), t(0.99), t(1e-8), t(float(opts.get("momentum", 0.0))))
    fn = make_flat_step(bool(opts.get("centered")), opts.get("momentum", 0) > 0)
    sync = sync_fn(st.device)
    t0 = time.perf_counter()
    fn(bufs, *hyper)
    sync()
    first = time.perf_counter() - t0
    out["flat_kernel"] = time_steps(lambda: fn(bufs, *hyper), st)
    out["flat_kernel"]["first_call_s"] = first
    out["flat_kernel"]["step_memory"] = peak_temporary_bytes(lambda: fn(bufs, *hyper), st.device)
    out["triad_after"] = measure_triad(st)
    return out


def _first_calls(step, device: str, n: int = 3) -> list[float]:
    sync = sync_fn(device)
    firsts = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        sync()
        firsts.append(time.perf_counter() - t0)
    return firsts


def worker_ours(spec: dict, st: Settings, phase: str) -> dict:
    """NpuFusedRMSprop(backend="inductor"): first call (cold or warm), steady step, and
    (warm phase) the step with grads freshly allocated before every step."""
    from npu_optim_compile import NpuFusedRMSprop

    params = make_params(spec, st.device)
    opt = NpuFusedRMSprop(params, lr=STEP_LR, backend="inductor", **spec["options"])
    firsts = _first_calls(opt.step, st.device)
    out: dict = {"first_call_s": firsts[0], "first_calls_s": firsts}
    if phase == "warm":  # a triad beside our step, for the run's bandwidth median
        out["triad"] = measure_triad(st)
    sources = [p.grad.clone() for p in params]
    # Grads kept between steps, as zero_grad(set_to_none=False) keeps them: it points
    # each .grad at its slot of our flat grad buffer (a step never re-points a grad);
    # the values are then written back in place, as a backward accumulates them.
    opt.zero_grad(set_to_none=False)
    import torch

    torch._foreach_copy_([p.grad for p in params], sources)
    out["step"] = time_steps(opt.step, st)
    if phase == "warm":

        def fresh_grads():
            for p, g in zip(params, sources):
                p.grad = g.clone()

        out["fresh_grads"] = time_steps(opt.step, st, before=fresh_grads)
    return out


def worker_ours_mem(spec: dict, st: Settings) -> dict:
    """Memory of NpuFusedRMSprop (warm cache): first step (gathers into flat buffers),
    steady step, step with fresh grads; persistent bytes after a step."""
    from npu_optim_compile import NpuFusedRMSprop

    params = make_params(spec, st.device)
    opt = NpuFusedRMSprop(params, lr=STEP_LR, backend="inductor", **spec["options"])
    # Compile first (so compile-time allocations do not count), on a throwaway copy.
    warm_params = make_params(spec, st.device)
    NpuFusedRMSprop(warm_params, lr=STEP_LR, backend="inductor", **spec["options"]).step()
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


def worker_torch_compile(spec: dict, st: Settings) -> dict:
    """``torch.compile`` of torch.optim.RMSprop's step (foreach=True, tensor lr)."""
    import torch

    params = make_params(spec, st.device)
    lr = torch.tensor(STEP_LR, device=st.device)
    opt = torch.optim.RMSprop(params, lr=lr, foreach=True, **spec["options"])

    @torch.compile
    def step():
        opt.step()

    firsts = _first_calls(step, st.device)
    return {"first_call_s": firsts[0], "first_calls_s": firsts, "step": time_steps(step, st)}


def run_worker(args) -> None:
    """Entry of a worker process (``bench_rmsprop.py --worker TASK ...``)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    st = Settings(args.quick, args.device)
    t0 = time.perf_counter()
    try:
        if args.worker == "baseline":
            res = worker_baseline(spec, st)
        elif args.worker == "ours":
            res = worker_ours(spec, st, args.phase)
        elif args.worker == "ours_mem":
            res = worker_ours_mem(spec, st)
        elif args.worker == "torch_compile":
            res = worker_torch_compile(spec, st)
        elif args.worker == "side_by_side":
            from side_by_side import worker_side_by_side

            res = worker_side_by_side(spec, st, with_torch_compile=args.phase == "with_tc")
        elif args.worker == "loop":
            from loops import worker_loop

            res = worker_loop(spec, st, args.loop, args.method)
        elif args.worker == "loops_side":
            from loops import worker_loops_side

            res = worker_loops_side(spec, st, args.loop, args.method.split(","))
        else:
            raise ValueError(f"unknown worker task {args.worker!r}")
    except Exception:
        res = {"error": traceback.format_exc()}
    res["worker_wall_s"] = time.perf_counter() - t0
    res["threads"] = torch.get_num_threads()
    Path(args.result).write_text(json.dumps(res))
