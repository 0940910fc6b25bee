"""The PNG of a results JSON: step-only step times and first calls (left), training-loop
iterations and first calls (right). Needs matplotlib."""

from __future__ import annotations

from pathlib import Path

from report import figures, has_step_only, step_stat
from report_loops import COLUMNS, LOOP_ORDER, loop_models, median, result

STEP_METHODS = [
    ("flat_kernel", "one fused flat kernel", "#7f7f7f"),
    ("ours", "ours (NpuFusedRMSprop)", "#d62728"),
    ("ours_fresh_grads", "ours, fresh grads", "#ff9896"),
    ("torch_compile", "torch.compile(opt.step)", "#1f77b4"),
    ("foreach", "torch RMSprop foreach=True", "#2ca02c"),
    ("for_loop", "torch RMSprop foreach=False", "#98df8a"),
]
LOOP_COLORS = {
    "ours": "#d62728",
    "ours_cts": "#ff9896",
    "tc_step": "#1f77b4",
    "foreach": "#2ca02c",
    "for_loop": "#98df8a",
    "no_step": "#7f7f7f",
}


def _grouped(ax, groups: list[str], series: list[tuple[str, str, list]], ylabel: str) -> None:
    """Bars: one group per x position, one bar per series (values may be None)."""
    width = 0.8 / max(1, len(series))
    for i, (label, color, values) in enumerate(series):
        xs = [j - 0.4 + (i + 0.5) * width for j, v in enumerate(values) if v]
        ax.bar(xs, [v for v in values if v], width, label=label, color=color)
    ax.set_yscale("log")
    _log_limits(ax, [v for _, _, values in series for v in values])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", which="both", alpha=0.3)


def _log_limits(ax, values) -> None:
    """Log-scale bars start at the axis' bottom: put it well below the smallest bar."""
    values = [v for v in values if v]
    if values:
        ax.set_ylim(min(values) / 4, max(values) * 3)


def _legend(ax, ncol: int) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=ncol)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def _step_panels(data: dict, ax, ax2) -> None:
    if not has_step_only(data):
        _empty(ax, "no step-only measurements in this file")
        _empty(ax2, "")
        return
    fig_data = figures(data)
    models = [m for m in fig_data if any(k in data["models"][m] for k in ("baseline", "ours_warm"))]
    mins = step_stat(data, "min_s")
    width = 0.8 / len(STEP_METHODS)
    for i, (key, label, color) in enumerate(STEP_METHODS):
        xs, ys, mx, my = [], [], [], []
        for j, m in enumerate(models):
            x = j - 0.4 + (i + 0.5) * width
            if fig_data[m][key]:
                xs.append(x)
                ys.append(fig_data[m][key] * 1e3)
            if mins[m][key]:
                mx.append(x)
                my.append(mins[m][key] * 1e3)
        ax.bar(xs, ys, width, label=label, color=color)
        ax.scatter(mx, my, marker="_", color="black", s=40, zorder=3, label="fastest single step" if i == 0 else None)
    for j, m in enumerate(models):
        fl = fig_data[m]["floor"]
        if fl:
            ax.hlines(fl * 1e3, j - 0.45, j + 0.45, colors="black", linewidth=2,
                      label="memory floor (bytes / triad bandwidth)" if j == 0 else None)
    ax.set_yscale("log")
    _log_limits(ax, [fig_data[m][k] * 1e3 for m in models for k, _, _ in STEP_METHODS + [("floor", 0, 0)]
                     if fig_data[m].get(k)])
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{m}\n{data['models'][m].get('tensors', '?')} tensors" for m in models], fontsize=8)
    ax.set_ylabel("step time, ms (bars: median; dashes: fastest)")
    ax.set_title("step-only (hand-set grads)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", which="both", alpha=0.3)

    first = [
        ("ours_cold_first", "ours, cold", "#d62728"),
        ("ours_warm_first", "ours, warm", "#ff9896"),
        ("flat_cold_first", "flat kernel, cold", "#7f7f7f"),
        ("tc_cold_first", "torch.compile, cold", "#1f77b4"),
        ("tc_warm_first", "torch.compile, warm", "#aec7e8"),
    ]
    _grouped(ax2, models, [(label, color, [fig_data[m][key] for m in models]) for key, label, color in first],
             "first call, s (log scale)")
    ax2.set_title("step-only: first call", fontsize=10)
    ax2.legend(fontsize=7, ncol=3)


def _loop_panels(data: dict, ax, ax2) -> None:
    lm = loop_models(data)
    if not lm:
        _empty(ax, "no training-loop measurements in this file")
        _empty(ax2, "")
        return
    groups = [(m, loop) for loop in LOOP_ORDER for m, e in lm.items() if e["loops"].get(loop)]
    names = [f"{m}\n{loop}" for m, loop in groups]
    series, steps = [], []
    for key, header in COLUMNS:
        iters = [median(lm[m], loop, key, "iteration") for m, loop in groups]
        if not any(iters):
            continue
        iters = [None if v is None else v * 1e3 for v in iters]
        series.append((header.rstrip(" ¹²"), LOOP_COLORS[key], iters))
        steps.append([None if (s := median(lm[m], loop, key, "step")) is None else s * 1e3 for m, loop in groups])
    _grouped(ax, names, series, "ms (log scale)")
    width = 0.8 / max(1, len(series))
    for i, values in enumerate(steps):  # the step's part of each eager iteration
        xs = [j - 0.4 + (i + 0.5) * width for j, v in enumerate(values) if v]
        ax.bar(xs, [v for v in values if v], width * 0.5, color="black", alpha=0.55,
               label="opt.step() alone (eager loops)" if i == 0 else None)
    ax.set_title("training loops: whole iteration (bars), step alone (dark inner bars)", fontsize=10)
    _legend(ax, 2)
    firsts = []
    for key, header in COLUMNS:
        vals = [(result(lm[m], loop, key) or {}).get("first_call_s") for m, loop in groups]
        if any(vals):
            firsts.append((header.rstrip(" ¹²"), LOOP_COLORS[key], vals))
    _grouped(ax2, names, firsts, "first iteration, s (log scale)")
    ax2.set_title("training loops: first iteration (compiles)", fontsize=10)
    _legend(ax2, 3)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(18, 10), gridspec_kw={"height_ratios": [3, 2]})
    _step_panels(data, axes[0][0], axes[1][0])
    _loop_panels(data, axes[0][1], axes[1][1])
    mi = data.get("machine", {})
    where = mi.get("cpu_model") if mi.get("device", "cpu") == "cpu" else mi.get("gpu")
    fig.suptitle(f"RMSprop, {mi.get('device', '?')}: {where}, {mi.get('cpu_count', '?')} cores, "
                 f"{mi.get('torch_threads', '?')} threads, torch {mi.get('torch', '?')}, {str(mi.get('date', ''))[:10]}"
                 f"{' (quick run)' if data.get('config', {}).get('quick') else ''}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
