"""``--profile``: where ``NpuFusedRMSprop.step()`` spends its time inside a real training
loop (``--loop default``: fresh grads from ``zero_grad()``; ``--loop kept``:
``zero_grad(set_to_none=False)``), through public calls only.

Runs in the calling process (with the caller's ``TORCHINDUCTOR_CACHE_DIR``):

1. the loop's step and iteration times (medians, as the benchmark measures them);
2. ``cProfile`` over ``--profile-steps`` calls of ``opt.step()`` (enabled around the
   step only), top functions by total and by cumulative time;
3. ``torch.profiler`` over a few iterations, each part labelled with
   ``record_function``: the op table sorted by self CPU time.
"""

from __future__ import annotations

import cProfile
import datetime
import io
import os
import pstats
import sys
from pathlib import Path

from common import MODELS, Settings, summarize, sync_fn


def _stats(pr: cProfile.Profile, key: str, limit: int = 25) -> str:
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats(key).print_stats(limit)
    return s.getvalue().strip()


def profile_ours(args) -> None:
    """``--profile``: the report for ``--loop`` (default, kept or both), printed (and
    written to ``--profile-out``)."""
    import torch

    loops = ("default", "kept") if args.loop == "both" else (args.loop,)
    if "compiled" in loops:
        sys.exit("--profile: --loop must be default, kept or both (in the compiled loop the step is inside the graph)")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available here; skipped.")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    model_name = (args.models or "1000tiny").split(",")[0]
    spec = MODELS.get(model_name)
    if spec is None or "net" not in spec:
        with_net = ", ".join(m for m, s in MODELS.items() if "net" in s)
        sys.exit(f"--profile: model {model_name!r} has no network; choose from {with_net}")
    text = "\n\n".join(profile_loop(model_name, spec, loop, args) for loop in loops)
    print(text)
    if args.profile_out:
        Path(args.profile_out).write_text(text + "\n")
        print(f"wrote {args.profile_out}")


def profile_loop(model_name: str, spec: dict, loop: str, args) -> str:
    """One loop's report: timings, cProfile of opt.step(), torch.profiler table."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from loops import build_net, loss_fn, make_optimizer

    set_to_none = loop == "default"
    st = Settings(args.quick, args.device)
    sync = sync_fn(args.device)
    model, batches = build_net(spec["net"], args.device)
    opt = make_optimizer("ours", list(model.parameters()), args.device)

    def iteration(i: int, step=None) -> tuple[float, float]:
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        loss_fn(model, x, y).backward()
        sync()
        t1 = time.perf_counter()
        (step or opt.step)()
        sync()
        t2 = time.perf_counter()
        return t2 - t1, t2 - t0

    t0 = time.perf_counter()
    iteration(0)
    first = time.perf_counter() - t0
    for i in range(1, 1 + st.warmup):
        iteration(i)
    n = max(1, args.profile_steps)
    timed = [iteration(i) for i in range(n)]
    steps, iters = summarize([t[0] for t in timed]), summarize([t[1] for t in timed])

    pr = cProfile.Profile()

    def profiled_step():
        pr.enable()
        opt.step()
        pr.disable()

    for i in range(n):
        iteration(i, profiled_step)

    n_torch = min(n, 50)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])) as prof:
        for i in range(n_torch):
            x, y = batches[i % len(batches)]
            with record_function("## zero_grad"):
                opt.zero_grad(set_to_none=set_to_none)
            with record_function("## forward"):
                loss = loss_fn(model, x, y)
            with record_function("## backward"):
                loss.backward()
            with record_function("## opt.step"):
                opt.step()

    net = spec["net"]
    lines = [
        f"# Profile of NpuFusedRMSprop.step(), model {model_name} ({net['blocks']} residual blocks "
        f"Linear({net['width']}, {net['width']}), {2 * net['blocks']} tensors), loop {loop!r} "
        f"(zero_grad(set_to_none={set_to_none}))",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}, "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}, "
        f"TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR', '(default)')}",
        "",
        "| what | median µs | p25 µs | p75 µs | fastest µs | count |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("opt.step()", steps), ("whole iteration", iters)):
        lines.append(
            f"| {label} | {r['median_s'] * 1e6:.0f} | {r['p25_s'] * 1e6:.0f} | {r['p75_s'] * 1e6:.0f} | "
            f"{r['min_s'] * 1e6:.0f} | {r['n']} |"
        )
    lines += [
        "",
        f"First iteration (compiles our step): {first:.2f} s.",
        "",
        f"## cProfile of opt.step() only, {n} steps, sorted by tottime (top 25)",
        "",
        "```",
        _stats(pr, "tottime"),
        "```",
        "",
        f"## cProfile of opt.step() only, {n} steps, sorted by cumulative time (top 25)",
        "",
        "```",
        _stats(pr, "cumulative"),
        "```",
        "",
        f"## torch.profiler, {n_torch} whole iterations (## rows: the parts), sorted by self CPU time",
        "",
        "```",
        prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25),
        "```",
    ]
    return "\n".join(lines)
