"""Markdown tables and targets from a results JSON: the step-only measurements here, the
training loops in ``report_loops.py``; ``table(data)`` prints both.

Every figure is read with ``get``: a key that a file does not have (an older schema, a
partial run, a worker that failed) shows as "–" and never raises.
"""

from __future__ import annotations

import statistics

DASH = "–"


# ---- formatting -------------------------------------------------------------------


def get(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def ms(x):
    return DASH if x is None else (f"{x * 1e3:.3g}" if x * 1e3 < 100 else f"{x * 1e3:.0f}")


def secs(x):
    return DASH if x is None else (f"{x:.2f}" if x < 10 else f"{x:.0f}")


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def times(r):
    return DASH if r is None else f"{r:.2f}×"


def mib(b):
    return DASH if b is None else f"{b / 2**20:.1f}"


def yes_no(met):
    return DASH if met is None else ("yes" if met else "**no**")


# ---- step-only figures ------------------------------------------------------------


def bandwidth(data: dict, key: str = "bandwidth_GBps") -> float | None:
    """Median of every triad measured in the run (three per model), in bytes/s."""
    bws = []
    for e in data.get("models", {}).values():
        for where, k in (("baseline", "triad"), ("baseline", "triad_after"), ("ours_warm", "triad")):
            if key == "best_bandwidth_GBps":  # from the fastest triad, not the median
                t, b = get(e, where, k, "min_s"), get(e, where, k, "bytes")
                bw = b / t / 1e9 if t and b else None
            else:
                bw = get(e, where, k, key)
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


def has_step_only(data: dict) -> bool:
    return any(k in e for e in data.get("models", {}).values() for k in ("baseline", "ours_warm", "ours_cold"))


def step_stat(data: dict, stat: str) -> dict:
    """Per model and method: one statistic of the step times (``min_s``, ``p25_s``...)."""
    return {
        m: {k: get(e, *path, stat) for k, path in STEP_PATHS.items()}
        for m, e in data.get("models", {}).items()
    }


def _bucket_bytes(e: dict):
    if e.get("bucket_bytes"):
        return e["bucket_bytes"]
    return max((b["bytes"] for b in get(e, "ours_warm", "buckets") or []), default=None)  # older files


def figures(data: dict, stat: str = "median_s") -> dict:
    """Per model: step times (s, ``stat`` of the repeats: the median, or ``min_s`` with
    the floor from the fastest triads) per method, floor, first calls, memory."""
    bw = bandwidth(data, "best_bandwidth_GBps" if stat == "min_s" else "bandwidth_GBps")
    bwi = bandwidth(data, "inplace_bandwidth_GBps")
    steps = step_stat(data, stat)
    out = {}
    for m, e in data.get("models", {}).items():
        fb = e.get("floor_bytes")
        out[m] = {
            "floor": fb / bw if bw and fb else None,
            "floor_inplace": fb / bwi if bwi and fb else None,
            **steps[m],
            "ours_cold_first": get(e, "ours_cold", "first_call_s"),
            "ours_warm_first": get(e, "ours_warm", "first_call_s"),
            "tc_cold_first": get(e, "tc_cold", "first_call_s"),
            "tc_warm_first": get(e, "tc_warm", "first_call_s"),
            "tc_cold_calls": get(e, "tc_cold", "first_calls_s"),
            "flat_cold_first": get(e, "baseline", "flat_kernel", "first_call_s"),
            "torch_persistent": get(e, "baseline", "for_loop", "persistent_bytes"),
            "torch_peak_tmp": get(e, "baseline", "for_loop", "step_memory", "peak_bytes"),
            "foreach_peak_tmp": get(e, "baseline", "foreach", "step_memory", "peak_bytes"),
            "ours_persistent": get(e, "ours_mem", "persistent_bytes"),
            "ours_peak_tmp": get(e, "ours_mem", "step_memory", "peak_bytes"),
            "ours_fresh_peak_tmp": get(e, "ours_mem", "fresh_grads_step_memory", "peak_bytes"),
            "ours_first_peak_tmp": get(e, "ours_mem", "first_step_memory", "peak_bytes"),
            "bucket_bytes": _bucket_bytes(e),
        }
    return out


def step_targets(data: dict, stat: str = "median_s") -> list[tuple[str, str, bool | None]]:
    fig = figures(data, stat)
    models = data.get("models", {})
    rows: list[tuple[str, str, bool | None]] = []

    def at_least(r, x):
        return None if r is None else r >= x

    for m, f in fig.items():
        if (models[m].get("numel") or 0) >= 4_000_000 and f["ours"] is not None:
            r = ratio(f["ours"], f["floor"])
            rows.append((f"step ≤ 1.25× floor ({m})", times(r), None if r is None else r <= 1.25))
    f = fig.get("200x4M")
    if f and f["ours"] is not None:
        r, rf = ratio(f["foreach"], f["ours"]), ratio(f["foreach"], f["flat_kernel"])
        rows.append(("≥ 8× faster than foreach=True (200x4M)", f"{times(r)} (flat kernel: {times(rf)})", at_least(r, 8)))
        r, rf = ratio(f["torch_compile"], f["ours"]), ratio(f["torch_compile"], f["flat_kernel"])
        rows.append(("≥ 2.5× faster than torch.compile(opt.step) (200x4M)", f"{times(r)} (flat kernel: {times(rf)})",
                     at_least(r, 2.5)))
    for m in ("1000x4M", "1000tiny"):
        c = get(fig, m, "ours_cold_first")
        if c is not None:
            rows.append((f"cold first call ≤ 3 s ({m})", f"{c:.2f} s", c <= 3))
    a, b = get(fig, "10x4M", "ours_cold_first"), get(fig, "1000x4M", "ours_cold_first")
    if a and b:
        g = b / a - 1
        rows.append(("cold first call grows < 50 % from 10 to 1000 tensors", f"{a:.2f} s → {b:.2f} s ({g:+.0%})", g < 0.5))
    f = fig.get("1000tiny")
    if f and f["ours"] is not None:
        r, rf = ratio(f["foreach"], f["ours"]), ratio(f["foreach"], f["flat_kernel"])
        rows.append(("1000 tiny tensors ≥ 20× faster than foreach=True", f"{times(r)} (flat kernel: {times(rf)})",
                     at_least(r, 20)))
    for m, f in fig.items():
        if f["ours_persistent"] is not None and f["torch_persistent"] is not None:
            rows.append((f"persistent memory ≤ torch.optim.RMSprop's ({m})",
                         f"{mib(f['ours_persistent'])} vs {mib(f['torch_persistent'])} MiB",
                         f["ours_persistent"] <= f["torch_persistent"]))
        if None not in (f["ours_peak_tmp"], f["torch_peak_tmp"], f["bucket_bytes"], f["ours_persistent"],
                        f["torch_persistent"]):
            ours_peak = f["ours_persistent"] + f["ours_peak_tmp"]
            torch_peak = f["torch_persistent"] + f["torch_peak_tmp"]
            rows.append((f"step peak ≤ torch's + one bucket ({m})",
                         f"{mib(ours_peak)} vs {mib(torch_peak)} + {mib(f['bucket_bytes'])} MiB",
                         ours_peak <= torch_peak + f["bucket_bytes"]))
    return rows


STEP_HEADER = "| flat kernel | ours | ours, fresh grads | torch.compile | foreach=True | foreach=False |"


def _step_cells(f) -> str:
    return (f"| {ms(f['flat_kernel'])} | **{ms(f['ours'])}** | {ms(f['ours_fresh_grads'])} | "
            f"{ms(f['torch_compile'])} | {ms(f['foreach'])} | {ms(f['for_loop'])} |")


def step_tables(data: dict) -> list[str]:
    models = data.get("models", {})
    fig = {m: f for m, f in figures(data).items() if any(k in models[m] for k in ("baseline", "ours_warm"))}
    if not fig:
        return ["*No step-only measurements in this file.*"]
    lines = [
        "**Step time, ms (median)** (step-only: params with hand-set grads)",
        "",
        "| model | floor " + STEP_HEADER,
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {m} | {ms(f['floor'])} " + _step_cells(f) for m, f in fig.items()]
    mins = step_stat(data, "min_s")
    best_bw = bandwidth(data, "best_bandwidth_GBps")
    lines += [
        "",
        "**Step time, ms (minimum of the repeats)**: the fastest single step, an estimate of the "
        "step on a quiet machine (the medians above include waits for a descheduled thread)",
        "",
        "| model | floor (best triad) " + STEP_HEADER,
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in fig:
        fl = models[m]["floor_bytes"] / best_bw if best_bw and models[m].get("floor_bytes") else None
        lines.append(f"| {m} | {ms(fl)} " + _step_cells(mins[m]))
    lines += [
        "",
        "**Ratios** (ours / floor: lower is better, 1.00× is the floor; the others are speed-ups of ours, "
        "higher is better)",
        "",
        "| model | ours / floor | ours / in-place floor | flat kernel / floor | foreach=True / ours | "
        "foreach=False / ours | torch.compile / ours | ours / flat kernel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        lines.append(
            f"| {m} | {times(ratio(f['ours'], f['floor']))} | {times(ratio(f['ours'], f['floor_inplace']))} | "
            f"{times(ratio(f['flat_kernel'], f['floor']))} | "
            f"{times(ratio(f['foreach'], f['ours']))} | {times(ratio(f['for_loop'], f['ours']))} | "
            f"{times(ratio(f['torch_compile'], f['ours']))} | {times(ratio(f['ours'], f['flat_kernel']))} |"
        )
    lines += [
        "",
        "**First call, s** (cold: fresh process, empty inductor cache; warm: fresh process, cache filled by the "
        "cold run)",
        "",
        "| model | ours cold | ours warm | torch.compile cold | torch.compile warm | torch.compile cold, calls 2+3 | "
        "flat kernel cold |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, f in fig.items():
        calls = f["tc_cold_calls"]
        lines.append(
            f"| {m} | {secs(f['ours_cold_first'])} | {secs(f['ours_warm_first'])} | {secs(f['tc_cold_first'])} | "
            f"{secs(f['tc_warm_first'])} | {secs(sum(calls[1:]) if calls else None)} | {secs(f['flat_cold_first'])} |"
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
            f"| {m} | {mib(f['torch_persistent'])} | {mib(f['ours_persistent'])} | {mib(f['torch_peak_tmp'])} | "
            f"{mib(f['foreach_peak_tmp'])} | {mib(f['ours_peak_tmp'])} | {mib(f['ours_fresh_peak_tmp'])} | "
            f"{mib(f['ours_first_peak_tmp'])} | {mib(f['bucket_bytes'])} |"
        )
    lines += [
        "",
        "**Targets, step-only** (from the medians; the last two columns redo the step-time targets with the "
        "fastest step of each method and the fastest triad)",
        "",
        "| target | measured | met | fastest steps | met |",
        "|---|---|---|---|---|",
    ]
    for (name, value, met), (_, v2, met2) in zip(step_targets(data), step_targets(data, "min_s")):
        same = "first call" in name or "memory" in name or "peak" in name
        lines.append(f"| {name} | {value} | {yes_no(met)} | {'' if same else v2} | {'' if same else yes_no(met2)} |")
    return lines


def failures(data: dict) -> list[str]:
    out = []
    for m, e in data.get("models", {}).items():
        for k, v in e.items():
            if isinstance(v, dict) and "error" in v:
                out.append(f"{m}/{k}")
        for loop, per_method in (e.get("loops") or {}).items():
            for method, r in per_method.items():
                if isinstance(r, dict) and "error" in r:
                    out.append(f"{m}/{loop}/{method}" + (" (timed out)" if r.get("timed_out") else ""))
    return out


def table(data: dict) -> str:
    from report_loops import loop_tables
    from side_by_side import side_by_side_table

    mi = data.get("machine", {})
    cfg = data.get("config", {})
    bw = bandwidth(data)
    gpu = f"{mi['gpu']} (CUDA {mi.get('cuda', '?')}), " if mi.get("gpu") else ""
    head = (f"Run of {mi.get('date', '?')} on {gpu}{mi.get('cpu_model', '?')} ({mi.get('cpu_count', '?')} cores, "
            f"torch {mi.get('torch', '?')}, {mi.get('torch_threads', '?')} threads)"
            f"{', quick mode' if cfg.get('quick') else ''}.")
    if bw:
        head += (f" Triad bandwidth (median of the run): {bw / 1e9:.1f} GB/s; in-place triad "
                 f"{(bandwidth(data, 'inplace_bandwidth_GBps') or 0) / 1e9:.1f} GB/s.")
    side = side_by_side_table(data)
    lines = [head, ""] + (side + [""] if side else []) + loop_tables(data) + [""] + step_tables(data)
    failed = failures(data)
    if failed:
        lines += ["", "Workers that failed: " + ", ".join(failed)]
    return "\n".join(lines)
