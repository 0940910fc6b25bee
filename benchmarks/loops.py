"""Whole training iterations in three loops (runs inside a worker process).

- ``default``: ``opt.zero_grad()`` (PyTorch's default ``set_to_none=True``), forward,
  ``loss.backward()``, ``opt.step()``: every backward allocates fresh grads.
- ``kept``: the same with ``opt.zero_grad(set_to_none=False)``: the grads stay allocated
  and backward accumulates into them.
- ``compiled``: ``torch.compile(train_step)`` of forward, backward, ``opt.step()``,
  ``opt.zero_grad()`` (for ours also ``compile_train_step(train_step)``), and the same
  train step without ``opt.step()`` (``no_step``) as the reference.

Methods: ``ours`` (``NpuFusedRMSprop(params, lr=...)``, default options), ``foreach`` /
``for_loop`` (``torch.optim.RMSprop(foreach=True / False)``), ``tc_step``
(``torch.optim.RMSprop(lr=torch.tensor(lr), foreach=True)``: its step wrapped in
``torch.compile`` in the eager loops; in the compiled loop it is simply that optimizer
inside the compiled train step), ``ours_cts`` (compiled loop only:
``compile_train_step``) and ``no_step`` (compiled loop only).

Only public API: ``npu_optim_compile.NpuFusedRMSprop``, ``compile_train_step`` and torch.
"""

from __future__ import annotations

import math
import time

from common import (
    COMPILED_LOOP_METHODS,
    EAGER_LOOP_METHODS,
    LOOP_LR,
    Settings,
    net_summary,
    summarize,
    sync_fn,
)

#: What each (loop, method) is, in words (the JSON's ``what``).
OURS = "NpuFusedRMSprop(params, lr=lr)"
TORCH = "torch.optim.RMSprop(params, lr={lr}, foreach={foreach})"
WHAT = {
    ("eager", "ours"): OURS,
    ("eager", "foreach"): TORCH.format(lr="lr", foreach=True),
    ("eager", "for_loop"): TORCH.format(lr="lr", foreach=False),
    ("eager", "tc_step"): TORCH.format(lr="torch.tensor(lr)", foreach=True) + ", its step in torch.compile",
    ("compiled", "ours"): f"torch.compile(train_step) with {OURS}",
    ("compiled", "ours_cts"): f"compile_train_step(train_step) with {OURS}",
    ("compiled", "foreach"): "torch.compile(train_step) with " + TORCH.format(lr="lr", foreach=True),
    ("compiled", "for_loop"): "torch.compile(train_step) with " + TORCH.format(lr="lr", foreach=False),
    ("compiled", "tc_step"): "torch.compile(train_step) with "
    + TORCH.format(lr="torch.tensor(lr)", foreach=True)
    + " (no separate torch.compile(opt.step): the step is in the train step's graph)",
    ("compiled", "no_step"): f"torch.compile(train_step) without opt.step() (zero_grad of {OURS})",
}


def build_net(net: dict, device: str, n_batches: int = 8):
    """The residual network and a few fixed batches (seeded)."""
    import torch

    class Block(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(width, width)

        def forward(self, x):
            return x + torch.tanh(self.fc(x))

    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(net["width"]) for _ in range(net["blocks"]))).to(device)
    g = torch.Generator().manual_seed(1)
    shape = (net["batch"], net["width"])
    batches = [
        (torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device))
        for _ in range(n_batches)
    ]
    return model, batches


def make_optimizer(method: str, params, device: str):
    import torch

    if method in ("ours", "ours_cts", "no_step"):
        from npu_optim_compile import NpuFusedRMSprop

        return NpuFusedRMSprop(params, lr=LOOP_LR)
    if method == "tc_step":
        return torch.optim.RMSprop(params, lr=torch.tensor(LOOP_LR, device=device), foreach=True)
    if method in ("foreach", "for_loop"):
        return torch.optim.RMSprop(params, lr=LOOP_LR, foreach=method == "foreach")
    raise ValueError(f"unknown method {method!r}")


def loss_fn(model, x, y):
    import torch

    return torch.nn.functional.mse_loss(model(x), y)


def denormal_fraction(model, batches, opt) -> float | None:
    """Share of the nonzero grad elements of one eager backward that are denormal floats
    (they slow the CPU several-fold; the models are built to have none)."""
    import torch

    opt.zero_grad()
    loss_fn(model, *batches[0]).backward()
    nonzero = denormal = 0
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.abs()
        nonzero += int((g > 0).sum())
        denormal += int(((g > 0) & (g < torch.finfo(g.dtype).tiny)).sum())
    opt.zero_grad()
    return denormal / nonzero if nonzero else None


def denormal_state_fraction(opt) -> float | None:
    """The same share over the optimizer's state tensors (square_avg holds squared grads)."""
    import torch

    nonzero = denormal = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() > 0:
                a = v.detach().abs()
                nonzero += int((a > 0).sum())
                denormal += int(((a > 0) & (a < torch.finfo(a.dtype).tiny)).sum())
    return denormal / nonzero if nonzero else None


def _dynamo_counts() -> dict:
    """Graphs captured and graph breaks, from torch's own counters (torch internals: best
    effort, empty where they moved)."""
    try:
        from torch._dynamo.utils import counters

        return {
            "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "graph_breaks": int(sum(counters["graph_break"].values())),
        }
    except Exception:  # noqa: BLE001 - informational only
        return {}


def _eager_iteration(model, batches, opt, step, set_to_none: bool, sync, losses: list):
    """One eager iteration as a function of its index: zero_grad, forward, backward,
    step, each part timed (returned in that order, then the whole iteration)."""

    def iteration(i: int) -> tuple[float, ...]:
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=set_to_none)
        sync()
        t1 = time.perf_counter()
        loss = loss_fn(model, x, y)
        sync()
        t2 = time.perf_counter()
        loss.backward()
        sync()
        t3 = time.perf_counter()
        step()
        sync()
        t4 = time.perf_counter()
        losses.append(float(loss.detach()))
        return t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0

    return iteration


EAGER_PARTS = ("zero_grad", "forward", "backward", "step", "iteration")


def eager_loop(model, batches, opt, step, set_to_none: bool, st: Settings) -> dict:
    """zero_grad, forward, backward, step; each part timed; the first iteration apart."""
    times: dict[str, list[float]] = {k: [] for k in EAGER_PARTS}
    losses: list[float] = []
    iteration = _eager_iteration(model, batches, opt, step, set_to_none, sync_fn(st.device), losses)
    firsts = [iteration(i) for i in range(3)]
    i = 3
    for _ in range(st.warmup):
        iteration(i)
        i += 1
    start = time.perf_counter()
    while not st.enough(len(times["iteration"]), time.perf_counter() - start):
        for k, v in zip(EAGER_PARTS, iteration(i)):
            times[k].append(v)
        i += 1
    out = {
        "first_call_s": firsts[0][4],
        "first_step_s": firsts[0][3],
        "first_calls_s": [f[4] for f in firsts],
    }
    out.update({k: summarize(v) for k, v in times.items()})
    out["loss_first"], out["loss_last"] = losses[0], losses[-1]
    return out


def _compiled_iteration(model, batches, opt, method: str, sync, losses: list):
    """One call of the compiled train step (forward, backward, step, zero_grad) as a
    function of its index, timed (a one-element tuple: the whole iteration)."""
    import torch

    with_step = method != "no_step"

    def train_step(x, y):
        loss = loss_fn(model, x, y)
        loss.backward()
        if with_step:
            opt.step()
        opt.zero_grad()
        return loss

    if method == "ours_cts":
        from npu_optim_compile import compile_train_step

        compiled = compile_train_step(train_step)
    else:
        compiled = torch.compile(train_step)

    def iteration(i: int) -> tuple[float]:
        x, y = batches[i % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = compiled(x, y)
        sync()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        return (dt,)

    return iteration


def compiled_loop(model, batches, opt, method: str, st: Settings) -> dict:
    """The whole train step compiled; the step is inside the graph, so only whole
    iterations are timed."""
    losses: list[float] = []
    iteration = _compiled_iteration(model, batches, opt, method, sync_fn(st.device), losses)
    firsts = [iteration(i)[0] for i in range(3)]
    i = 3
    for _ in range(st.warmup):
        iteration(i)
        i += 1
    times: list[float] = []
    start = time.perf_counter()
    while not st.enough(len(times), time.perf_counter() - start):
        times.append(iteration(i)[0])
        i += 1
    return {
        "first_call_s": firsts[0],
        "first_calls_s": firsts,
        "iteration": summarize(times),
        "step": None,  # inside the graph
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "dynamo": _dynamo_counts(),
    }


def _step_of(opt, method: str):
    """What the eager loops call: ``opt.step``, or it under torch.compile (tc_step)."""
    import torch

    if method != "tc_step":
        return opt.step

    @torch.compile
    def step():
        opt.step()

    return step


def worker_loop(spec: dict, st: Settings, loop: str, method: str) -> dict:
    """One (model, loop, method) in this fresh process."""
    import torch

    allowed = COMPILED_LOOP_METHODS if loop == "compiled" else EAGER_LOOP_METHODS
    if method not in allowed:
        raise ValueError(f"method {method!r} does not exist in the {loop!r} loop")
    model, batches = build_net(spec["net"], st.device)
    params = list(model.parameters())
    opt = make_optimizer(method, params, st.device)
    if loop == "compiled":
        res = compiled_loop(model, batches, opt, method, st)
    else:
        res = eager_loop(model, batches, opt, _step_of(opt, method), set_to_none=loop == "default", st=st)
    res["what"] = WHAT["compiled" if loop == "compiled" else "eager", method]
    res["net"] = {**net_summary(spec["net"]), "tensors_built": len(params),
                  "numel_built": sum(p.numel() for p in params)}
    res["denormal_state_fraction"] = denormal_state_fraction(opt)
    res["denormal_grad_fraction"] = denormal_fraction(model, batches, opt)
    res["finite"] = all(math.isfinite(v) for v in (res["loss_first"], res["loss_last"]))
    return res


#: Iterations of one method per turn in the interleaved worker.
BLOCK = 5


def worker_loops_side(spec: dict, st: Settings, loop: str, methods: list[str]) -> dict:
    """Every method of one loop in this one process, timed interleaved: each builds its
    own copy of the network (the same seeded weights) and takes its first call (which
    compiles) and its warm-up alone; then the methods take turns of ``BLOCK`` iterations,
    the order rotating each round, until each has the run's count of samples. Anything
    else running on the machine lands on every method alike."""
    sync = sync_fn(st.device)
    parts = ("iteration",) if loop == "compiled" else EAGER_PARTS
    runs, times, out = {}, {}, {}
    for method in methods:
        model, batches = build_net(spec["net"], st.device)
        opt = make_optimizer(method, list(model.parameters()), st.device)
        losses: list[float] = []
        if loop == "compiled":
            iteration = _compiled_iteration(model, batches, opt, method, sync, losses)
        else:
            iteration = _eager_iteration(model, batches, opt, _step_of(opt, method), loop == "default", sync, losses)
        first = iteration(0)[-1]
        for i in range(1, 1 + st.warmup):
            iteration(i)
        runs[method] = (iteration, losses, opt)
        times[method] = {k: [] for k in parts}
        out[method] = {"first_call_in_process_s": first, "what": WHAT["compiled" if loop == "compiled" else "eager", method]}
    start, index, turn = time.perf_counter(), 1 + st.warmup, 0
    while not st.enough(len(times[methods[0]]["iteration"]), (time.perf_counter() - start) / len(methods)):
        for method in methods[turn % len(methods):] + methods[: turn % len(methods)]:
            iteration = runs[method][0]
            for k in range(BLOCK):
                for part, v in zip(parts, iteration(index + k)):
                    times[method][part].append(v)
        index += BLOCK
        turn += 1
    for method in methods:
        losses = runs[method][1]
        out[method].update({k: summarize(v) for k, v in times[method].items()})
        if loop == "compiled":
            out[method]["step"] = None
        out[method]["finite"] = all(math.isfinite(v) for v in (losses[0], losses[-1]))
    return {"methods": methods, "block": BLOCK, "results": out}
