"""Measure what the foreach fusion pass should do with foreach ops over unrelated tensors.

An experiment, not a test (``tests/repo/test_benchmarks.py`` only smoke-runs it with a few
tensors).  Each run compiles one RMSprop step with real inductor (a fresh inductor cache
unless ``TORCHINDUCTOR_CACHE_DIR`` is set; the FX graph cache is off) and prints compile
time and steady-state step time.  From the repository root::

    python benchmarks/bench_grouping.py VARIANT [N_TENSORS]     # N_TENSORS: default 200

Variants over N unrelated tensors of mixed shapes (about 4 M fp32 elements for N=200):

* ``foreach``: stock functional foreach step, no pass (inductor's own foreach lowering);
* ``lowered``: the same step with ``ForeachFusionPass`` (per-tensor lowering);
* ``grouped``: the step written as cat -> flat ops -> split + copy_ back per tensor,
  i.e. what a grouping pass would emit.

And over ``split`` views of flat buffers (the tiling case):

* ``views``: functional foreach over ``P.split(sizes)`` with one cat + copy_, no pass;
* ``views_pass``: the same with ``ForeachFusionPass`` (collapsed onto the flat buffers).
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_grouping_"))

import torch  # noqa: E402

from npu_optim_compile.passes import ForeachFusionPass  # noqa: E402

ALPHA, EPS = 0.99, 1e-8


def shapes_for(n: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        if i % 2:
            out.append((int(torch.randint(16, 4096, (1,), generator=g)),))
        else:
            out.append(tuple(int(v) for v in torch.randint(64, 320, (2,), generator=g)))
    return out


def foreach_step(ps, gs, ss, lr):
    ss2 = torch._foreach_mul(ss, ALPHA)
    ss2 = torch._foreach_addcmul(ss2, gs, gs, value=1 - ALPHA)
    avg = torch._foreach_add(torch._foreach_sqrt(ss2), EPS)
    ps2 = torch._foreach_sub(ps, torch._foreach_mul(torch._foreach_div(gs, avg), lr))
    for p, n in zip(ps, ps2):
        p.copy_(n)
    for s, n in zip(ss, ss2):
        s.copy_(n)


def grouped_step(ps, gs, ss, lr):
    P, G, S = (torch.cat([t.reshape(-1) for t in ts]) for ts in (ps, gs, ss))
    S2 = S * ALPHA + ((1 - ALPHA) * G) * G
    P2 = P - (G / (S2.sqrt() + EPS)) * lr
    sizes = [p.numel() for p in ps]
    for ts, flat in ((ps, P2), (ss, S2)):
        for t, n in zip(ts, flat.split(sizes)):
            t.copy_(n.view(t.shape))


def views_step(P, G, S, lr, sizes):
    ps, gs, ss = P.split(sizes), G.split(sizes), S.split(sizes)
    ss2 = torch._foreach_mul(ss, ALPHA)
    ss2 = torch._foreach_addcmul(ss2, gs, gs, value=1 - ALPHA)
    avg = torch._foreach_add(torch._foreach_sqrt(ss2), EPS)
    ps2 = torch._foreach_sub(ps, torch._foreach_mul(torch._foreach_div(gs, avg), lr))
    P.copy_(torch.cat(ps2))
    S.copy_(torch.cat(ss2))


def main(variant: str, n: int) -> None:
    torch._inductor.config.fx_graph_cache = False
    shapes = shapes_for(n)
    total = sum(torch.Size(s).numel() for s in shapes)
    lr = torch.tensor(0.01)
    options = {"post_grad_custom_pre_pass": ForeachFusionPass()} if variant in ("lowered", "views_pass") else {}
    if variant.startswith("views"):
        sizes = [torch.Size(s).numel() for s in shapes]
        args = (torch.randn(total), torch.randn(total), torch.rand(total), lr)
        fn = functools.partial(views_step, sizes=sizes)
    else:
        args = tuple([torch.randn(s) for s in shapes] for _ in range(2)) + ([torch.rand(s) for s in shapes], lr)
        fn = {"foreach": foreach_step, "lowered": foreach_step, "grouped": grouped_step}[variant]
    with torch.no_grad():
        step = torch.compile(fn, fullgraph=True, options=options)
        start = time.perf_counter()
        step(*args)
        compile_s = time.perf_counter() - start
        for _ in range(5):
            step(*args)
        times = []
        for _ in range(9):
            start = time.perf_counter()
            for _ in range(10):
                step(*args)
            times.append((time.perf_counter() - start) / 10)
    times.sort()
    print(
        f"{variant:10s} tensors={n} elements={total / 1e6:.2f}M compile={compile_s:.1f}s "
        f"step_median={times[4] * 1e3:.2f}ms step_min={times[0] * 1e3:.2f}ms"
    )


VARIANTS = ("foreach", "lowered", "grouped", "views", "views_pass")

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3) or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python benchmarks/bench_grouping.py {{{'|'.join(VARIANTS)}}} [N_TENSORS]")
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200)
