"""Step-only, side by side in one process: every method on its own copy of the same
params, timed interleaved, against the memory floor from a copy kernel.

Methods (``SIDE_METHODS``; the JSON keys): ``ours`` (``NpuFusedRMSprop(backend="inductor")``,
grads kept between steps as after ``zero_grad(set_to_none=False)``), ``foreach``
(``torch.optim.RMSprop(foreach=True)``), ``capturable`` (the same with ``capturable=True``:
CUDA only, torch refuses it on the CPU) and ``tc_step`` (``torch.optim.RMSprop(lr=
torch.tensor(lr), foreach=True)`` with its step in ``torch.compile``; left out with
``--skip-torch-compile`` or outside ``--tc-models``).

Timing: after each method's first call (timed alone: it compiles) and a warm-up, the
methods take turns (the order rotating each round), each timing a block of
``block`` steps: with CUDA events around the block on CUDA (``torch.cuda.Event``,
then ``synchronize``), with ``time.perf_counter`` on the CPU. One sample is the block's
time per step; rounds repeat until the run settings' count and time budget are met.

Floor: the bytes the step must move (``common.floor_bytes``) divided by the bandwidth
of a device-to-device copy (``dst.copy_(src)``, bytes read plus bytes written) over a
buffer far larger than the caches. Nothing here imports torch at module import time
(``--table`` reads the JSON without it).
"""

from __future__ import annotations

import time

from common import STEP_LR, Settings, floor_bytes, summarize

SIDE_METHODS = ("ours", "foreach", "capturable", "tc_step")
WHAT = {
    "ours": 'NpuFusedRMSprop(params, lr=lr, backend="inductor"), grads kept between steps',
    "foreach": "torch.optim.RMSprop(params, lr=lr, foreach=True)",
    "capturable": "torch.optim.RMSprop(params, lr=lr, foreach=True, capturable=True)",
    "tc_step": "torch.optim.RMSprop(params, lr=torch.tensor(lr), foreach=True), its step in torch.compile",
}
#: Steps per timed block: CUDA steps of small models are tens of microseconds, so a
#: block of them is timed between two events; on the CPU a block of 2.
BLOCK = {"cuda": 10, "cpu": 2}


def methods_for(device: str, with_torch_compile: bool) -> list[str]:
    """The methods measured on ``device``: capturable=True needs CUDA (torch's
    ``_get_capturable_supported_devices``), torch.compile only when asked."""
    return [m for m in SIDE_METHODS
            if (m != "capturable" or device == "cuda") and (m != "tc_step" or with_torch_compile)]


class Timer:
    """Seconds per call of ``fn`` over ``n`` calls: CUDA events on CUDA, else perf_counter."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device == "cuda"
        self.torch = torch

    def per_call(self, fn, n: int) -> float:
        if self.cuda:
            start = self.torch.cuda.Event(enable_timing=True)
            end = self.torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / n
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def measure_copy(st: Settings, timer: Timer) -> dict:
    """Bandwidth of ``dst.copy_(src)``: 2 x 4 bytes per fp32 element (read + write), over
    the triad's buffer size (``Settings.triad_numel``: 1 GiB on CUDA, far beyond any L2)."""
    import torch

    n = st.triad_numel
    src, dst = torch.rand(n, device=st.device), torch.empty(n, device=st.device)
    for _ in range(3):
        dst.copy_(src)
    samples = [timer.per_call(lambda: dst.copy_(src), 5) for _ in range(max(5, st.min_repeats // 2))]
    out = summarize(samples)
    out.update(numel=n, bytes=2 * 4 * n, bandwidth_GBps=2 * 4 * n / out["median_s"] / 1e9)
    return out


def build(method: str, spec: dict, device: str):
    """(step function, params) of one method on a fresh copy of the model's params."""
    import torch
    from workers import make_params

    params = make_params(spec, device)
    opts = spec["options"]
    if method == "ours":
        from npu_optim_compile import NpuFusedRMSprop

        opt = NpuFusedRMSprop(params, lr=STEP_LR, backend="inductor", **opts)
        sources = [p.grad.clone() for p in params]
        opt.zero_grad(set_to_none=False)  # grads become views of the flat grad buffer...
        torch._foreach_copy_([p.grad for p in params], sources)  # ...holding the same values
        return opt.step, params
    if method == "tc_step":
        opt = torch.optim.RMSprop(params, lr=torch.tensor(STEP_LR, device=device), foreach=True, **opts)
        return torch.compile(opt.step), params
    capturable = method == "capturable"
    opt = torch.optim.RMSprop(params, lr=STEP_LR, foreach=True, capturable=capturable, **opts)
    return opt.step, params


def worker_side_by_side(spec: dict, st: Settings, with_torch_compile: bool) -> dict:
    """Every method of ``methods_for`` on this model, interleaved; the copy floor."""
    timer = Timer(st.device)
    out: dict = {"device": st.device, "timer": "cuda_events" if timer.cuda else "perf_counter",
                 "block": BLOCK[st.device], "copy": measure_copy(st, timer)}
    out["floor_s"] = floor_bytes(spec) / (out["copy"]["bandwidth_GBps"] * 1e9)
    steps, results = {}, {}
    for method in methods_for(st.device, with_torch_compile):
        step, _params = build(method, spec, st.device)
        t0 = time.perf_counter()
        step()
        timer.sync()
        results[method] = {"what": WHAT[method], "first_call_s": time.perf_counter() - t0}
        for _ in range(st.warmup):
            step()
        steps[method] = (step, _params)  # the params stay alive with their step
    timer.sync()
    names = list(steps)
    samples: dict[str, list[float]] = {m: [] for m in names}
    rounds, start = 0, time.perf_counter()
    while not st.enough(rounds, (time.perf_counter() - start) / max(1, len(names))):
        for m in names[rounds % len(names):] + names[:rounds % len(names)]:
            samples[m].append(timer.per_call(steps[m][0], out["block"]))
        rounds += 1
    for m in names:
        results[m]["step"] = summarize(samples[m])
    out.update(methods=results, rounds=rounds)
    return out


# ---- the report (no torch) ---------------------------------------------------------


def side_by_side_table(data: dict) -> list[str]:
    """The Markdown table of every model's side-by-side result; [] when there is none."""
    from report import DASH, get, ms, ratio, secs, times

    rows = {m: e["side_by_side"] for m, e in data.get("models", {}).items() if "side_by_side" in e}
    if not rows:
        return []
    device = next(iter(rows.values())).get("device", "?")
    lines = [
        f"**Side by side, interleaved in one process, ms per step (median)** ({device}; step-only: "
        "params with hand-set grads; floor: bytes moved / copy bandwidth; first calls in s)",
        "",
        "| model | floor | ours | foreach=True | capturable=True | torch.compile | ours / floor | "
        "first call: ours / torch.compile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        if "error" in r:
            lines.append(f"| {m} | failed | | | | | | |")
            continue
        med = {k: get(r, "methods", k, "step", "median_s") for k in SIDE_METHODS}
        cells = [ms(med[k]) for k in SIDE_METHODS]
        cells[0] = f"**{cells[0]}**"
        first = " / ".join(secs(get(r, "methods", k, "first_call_s")) for k in ("ours", "tc_step"))
        lines.append(f"| {m} | {ms(r.get('floor_s'))} | " + " | ".join(cells)
                     + f" | {times(ratio(med['ours'], r.get('floor_s')))} | {first} |")
    bw = [get(r, "copy", "bandwidth_GBps") for r in rows.values()]
    bw = [b for b in bw if b]
    if bw:
        lines += ["", f"Copy bandwidth (read + write) of the run: {min(bw):.0f}-{max(bw):.0f} GB/s; "
                  f"timer: {next(iter(rows.values())).get('timer', DASH)}."]
    return lines
