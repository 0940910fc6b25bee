"""Markdown tables and targets of the training-loop measurements (``loops.py``)."""

from __future__ import annotations

from report import DASH, get, ms, ratio, secs, times, yes_no

LOOP_ORDER = ("default", "kept", "compiled")
LOOP_TITLE = {
    "default": "default (`zero_grad()`)",
    "kept": "kept (`zero_grad(set_to_none=False)`)",
    "compiled": "compiled (`torch.compile(train_step)`)",
}
#: Table columns: (method key, header).
COLUMNS = (
    ("ours", "ours"),
    ("ours_cts", "ours, compile_train_step"),
    ("tc_step", "torch.compile ¹"),
    ("foreach", "foreach=True"),
    ("for_loop", "foreach=False"),
    ("no_step", "no opt.step() ²"),
)
NOTES = (
    "¹ In the eager loops: `torch.optim.RMSprop(lr=torch.tensor(lr), foreach=True)` with its step in "
    "`torch.compile(opt.step)`; in the compiled loop: that optimizer inside `torch.compile(train_step)` "
    "(no separate step compile). In the compiled loop foreach=True / foreach=False are "
    "`torch.optim.RMSprop(foreach=...)` with a float lr inside the compiled train step. "
    "² The same compiled train step without `opt.step()` (forward, backward, `zero_grad()`)."
)


def loop_models(data: dict) -> dict:
    return {m: e for m, e in data.get("models", {}).items() if e.get("loops")}


def result(e: dict, loop: str, method: str):
    return get(e, "loops", loop, method)


def median(e: dict, loop: str, method: str, part: str):
    """A steady figure: from the interleaved measurement (every method of the loop in one
    process, taking turns) where there is one, else from the method's own worker."""
    side = get(e, "loops_side", loop, "results", method, part, "median_s")
    return side if side is not None else get(result(e, loop, method), part, "median_s")


def _cell(e, loop, method, value, fmt) -> str:
    """The figure, or why there is none: not measured (–), failed, timed out."""
    r = result(e, loop, method)
    if isinstance(r, dict) and "error" in r:
        return "timed out" if r.get("timed_out") else "failed"
    return fmt(value)


def _rows(data: dict, loops=LOOP_ORDER):
    for loop in loops:
        for m, e in loop_models(data).items():
            if loop in e["loops"] and e["loops"][loop]:
                yield loop, m, e


def _header(first: str = "model | loop") -> list[str]:
    return [f"| {first} | " + " | ".join(h for _, h in COLUMNS) + " |", "|---|---|" + "---|" * len(COLUMNS)]


def _first_cell(e, loop, method) -> str:
    r = result(e, loop, method)
    if not isinstance(r, dict) or "error" in r:
        return _cell(e, loop, method, None, secs)
    text = secs(r.get("first_call_s"))
    if r.get("cache") == "warm":
        text += " (warm cache)"
    warm = get(r, "warm", "first_call_s")
    if warm is not None:
        text += f" / {secs(warm)} warm"
    return text


def loop_targets(data: dict) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    lm = loop_models(data)

    def faster(m, what, other, at_least, part="step", label=None):
        e = lm[m]
        r = ratio(median(e, "default", other, part), median(e, "default", "ours", part))
        rows.append((label or f"default loop: ours' {part} ≥ {at_least:g}× faster than {what}'s ({m})", times(r),
                     None if r is None else r >= at_least))

    if "200x4M" in lm:
        e = lm["200x4M"]
        r = ratio(median(e, "default", "ours", "step"), median(e, "kept", "ours", "step"))
        rows.append(("default loop: ours' step with fresh grads ≤ 2× its kept-grads step (200x4M)", times(r),
                     None if r is None else r <= 2))
        faster("200x4M", "foreach=True", "foreach", 4)
        faster("200x4M", "torch.compile(opt.step)", "tc_step", 1.2)
        for method, what in (("foreach", "foreach=True"), ("for_loop", "foreach=False"),
                             ("tc_step", "torch.compile(opt.step)")):
            e2 = median(e, "default", method, "iteration")
            o = median(e, "default", "ours", "iteration")
            r = ratio(e2, o)
            rows.append((f"default loop: ours' whole iteration faster than {what}'s (200x4M)",
                         f"{times(r)} ({ms(o)} vs {ms(e2)} ms)", None if r is None else r > 1))
    if "1000tiny" in lm:
        faster("1000tiny", "foreach=True", "foreach", 15)
    for m, e in lm.items():
        base = result(e, "compiled", "no_step")
        for method, what in (("ours", "torch.compile"), ("ours_cts", "compile_train_step")):
            r = result(e, "compiled", method)
            name = f"compiled loop ({what}): first call ≤ no-step first call + 10 s ({m})"
            if isinstance(r, dict) and r.get("timed_out"):  # its compile alone outlived the timeout
                rows.append((name, r["error"], False))
                continue
            if not isinstance(r, dict) or "first_call_s" not in r:
                continue
            b = get(base, "first_call_s")
            extra = None if b is None else r["first_call_s"] - b
            caches = f" ({r.get('cache', '?')} vs {get(base, 'cache') or '?'} cache)" if b is not None else ""
            rows.append((name, DASH if extra is None else f"{secs(r['first_call_s'])} s vs {secs(b)} s ({extra:+.1f} s)"
                         + caches, None if extra is None else extra <= 10))
            eager = median(e, "default", "ours", "iteration")
            q = ratio(get(r, "iteration", "median_s"), eager)
            rows.append((f"compiled loop ({what}): steady iteration ≤ 1.25× ours' eager default-loop iteration ({m})",
                         times(q), None if q is None else q <= 1.25))
    return rows


def loop_tables(data: dict) -> list[str]:
    lm = loop_models(data)
    if not lm:
        return ["*No training-loop measurements in this file (it predates them, or they were skipped).*"]
    lines = ["**Models of the training loops**", "", "| model | network | tensors | params | lr |", "|---|---|---|---|---|"]
    for m, e in lm.items():
        n = e.get("net") or {}
        numel = f"{n['numel']:,}" if isinstance(n.get("numel"), int) else DASH
        lines.append(f"| {m} | {n.get('desc', DASH)} | {n.get('tensors', DASH)} | {numel} | {n.get('lr', DASH)} |")
    side = any(e.get("loops_side") for e in lm.values())
    how = (" Every method of a loop timed interleaved in one process (turns of a few iterations, the "
           "order rotating)." if side else " Each method in a process of its own, one after another.")
    lines += ["", "**Whole training iteration, ms (median)**: zero_grad + forward + backward + step; "
              "compiled loop: one call of the compiled train step." + how, ""] + _header()
    for loop, m, e in _rows(data):
        cells = [_cell(e, loop, k, median(e, loop, k, "iteration"), ms) for k, _ in COLUMNS]
        cells[0] = f"**{cells[0]}**"
        lines.append(f"| {m} | {loop} | " + " | ".join(cells) + " |")
    lines += ["", NOTES, "", "**Optimizer step, ms (median)**: `opt.step()` alone in the eager loops; in the "
              "compiled loop the step is inside the graph: the row gives the iteration minus the no-step "
              "iteration (an estimate)", ""] + _header()
    for loop, m, e in _rows(data):
        cells = []
        for k, _ in COLUMNS:
            if loop == "compiled":
                v = None if k == "no_step" else _diff(median(e, loop, k, "iteration"),
                                                       median(e, loop, "no_step", "iteration"))
            else:
                v = median(e, loop, k, "step")
            cells.append(_cell(e, loop, k, v, ms))
        cells[0] = f"**{cells[0]}**"
        lines.append(f"| {m} | {loop} | " + " | ".join(cells) + " |")
    parts_rows = []
    for loop, m, e in _rows(data, ("default", "kept")):
        for k, h in COLUMNS:
            r = result(e, loop, k)
            if not isinstance(r, dict) or "error" in r:
                continue
            parts = [median(e, loop, k, p) for p in ("zero_grad", "forward", "backward", "step", "iteration")]
            share = ratio(parts[3], parts[4])
            parts_rows.append(f"| {m} | {loop} | {h} | " + " | ".join(ms(p) for p in parts)
                              + f" | {DASH if share is None else f'{share:.0%}'} |")
    if parts_rows:
        lines += ["", "**Parts of an eager iteration, ms (median)**", "",
                  "| model | loop | method | zero_grad | forward | backward | step | iteration | step share |",
                  "|---|---|---|---|---|---|---|---|---|"] + parts_rows
    lines += ["", "**First call, s**: the first iteration (it compiles what the method compiles); each in a "
              "fresh process with an empty inductor cache unless marked; \"/ x warm\": a second fresh process "
              "with the cache the first one filled", ""] + _header()
    for loop, m, e in _rows(data):
        lines.append(f"| {m} | {loop} | " + " | ".join(_first_cell(e, loop, k) for k, _ in COLUMNS) + " |")
    targets = loop_targets(data)
    lines += ["", "**Targets, training loops** (from the medians)", ""]
    if targets:
        lines += ["| target | measured | met |", "|---|---|---|"]
        lines += [f"| {name} | {value} | {yes_no(met)} |" for name, value, met in targets]
    else:
        lines.append("*None to evaluate: they need the default loop on 200x4M / 1000tiny, or the compiled loop.*")
    return lines


def _diff(a, b):
    return None if a is None or b is None else a - b
