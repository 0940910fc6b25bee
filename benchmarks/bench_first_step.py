"""The first step of an optimizer over many params, with the compile already cached.

The first ``opt.step()`` creates the state (as torch's ``_init_group`` does) and, for
``NpuFusedRMSprop``, makes the plan: buckets, overlap rounds, pointer tables. That work
must grow linearly with the number of params. Measured side by side with
``torch.optim.RMSprop(foreach=True)`` and ``foreach=False``, interleaved (method by method
for each size and repeat), each first step on fresh params; the compiled step is built
once beforehand on a small model of the same structure, so no compile is timed.

    python benchmarks/bench_first_step.py --params 5000,10000,20000,40000 --json out.json

Writes a JSON with the median of the repeats per size and method, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from npu_optim_compile import NpuFusedRMSprop

METHODS = {
    "ours": lambda params: NpuFusedRMSprop(params, lr=1e-3),
    "foreach": lambda params: torch.optim.RMSprop(params, lr=1e-3, foreach=True),
    "for_loop": lambda params: torch.optim.RMSprop(params, lr=1e-3, foreach=False),
}


def first_step(method: str, n: int, elements: int) -> float:
    params = [torch.nn.Parameter(torch.randn(elements)) for _ in range(n)]
    for p in params:
        p.grad = torch.randn(elements)
    opt = METHODS[method](params)
    start = time.perf_counter()
    opt.step()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="5000,10000,20000,40000", help="comma-separated param counts")
    parser.add_argument("--elements", type=int, default=10, help="elements per param")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.params.split(",")]
    methods = args.methods.split(",")
    first_step("ours", 4, args.elements)  # compile (or load) the step once: not timed
    times: dict[str, dict[int, list[float]]] = {m: {n: [] for n in counts} for m in methods}
    for n in counts:
        for _ in range(args.repeats):
            for m in methods:
                times[m][n].append(first_step(m, n, args.elements))
    result = {
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "config": {"elements": args.elements, "repeats": args.repeats},
        "first_step_s": {m: {str(n): statistics.median(v) for n, v in by_n.items()} for m, by_n in times.items()},
    }
    print("| params | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    for n in counts:
        print(f"| {n:,} | " + " | ".join(f"{result['first_step_s'][m][str(n)]:.3f} s" for m in methods) + " |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
