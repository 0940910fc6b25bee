"""python -m npu_optim_compile: see what the optimizer compiles for a model.

    python -m npu_optim_compile explain            # the default model, a table
    python -m npu_optim_compile explain --tensors 1000 --elements 4000000 \\
        --dtypes float32,bfloat16 --momentum 0.9 --centered
    python -m npu_optim_compile dump --out graphs/ # the same, and keep every file

A model is described by its tensor count, total elements and dtypes (tensors take the
dtypes in turn); one optimizer step is taken on random grads with graph dumps on, and
the table lists each bucket with the kernels its compiled graph holds and its compile
time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from ._bucket_step import BACKENDS

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m npu_optim_compile",
        description=__doc__.split("\n\n", 1)[1],  # the plain-text part (no reST markup)
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("explain", "print a table of buckets, kernels and compile time"),
                            ("dump", "write each compiled graph's files (see --out)")):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--tensors", type=int, default=200, help="number of parameter tensors (200)")
        sub.add_argument("--elements", type=int, default=1_000_000, help="total elements (1e6)")
        sub.add_argument("--dtypes", default="float32", help="comma-separated dtypes (float32)")
        sub.add_argument("--lr", type=float, default=1e-2)
        sub.add_argument("--momentum", type=float, default=0.0)
        sub.add_argument("--weight-decay", type=float, default=0.0)
        sub.add_argument("--centered", action="store_true")
        sub.add_argument("--backend", default="auto", choices=BACKENDS)
        if name == "dump":
            sub.add_argument("--out", required=True, help="folder for the graph files")
    return parser


def _model(tensors: int, elements: int, dtypes: list[torch.dtype]) -> list[torch.nn.Parameter]:
    if tensors < 1 or elements < tensors:
        raise SystemExit(f"need 1 <= --tensors <= --elements, got {tensors} tensors, {elements} elements")
    base, extra = divmod(elements, tensors)
    return [
        torch.nn.Parameter(torch.randn(base + (i < extra), dtype=dtypes[i % len(dtypes)]))
        for i in range(tensors)
    ]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.strip(), None)
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise SystemExit(f"unknown floating dtype {name!r} (try float32, bfloat16, float16, float64)")
    return dtype


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace, out: Path) -> str:
    from .optimizer import NpuFusedRMSprop

    params = _model(args.tensors, args.elements, [_dtype(d) for d in args.dtypes.split(",")])
    opt = NpuFusedRMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                          centered=args.centered, backend=args.backend, dump_dir=out)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    graphs = {}
    for summary_file in sorted(out.glob("*/summary.json")):
        summary = json.loads(summary_file.read_text())
        graphs[summary["graph"]] = (summary, summary_file.parent)
    rows = [["bucket", "dtype", "tensors", "elements", "kernels", "compile (s)", "graph files"]]
    for i, bucket in enumerate(opt.describe_buckets()):
        summary, folder = graphs.get(bucket["graph"], ({}, None))
        rows.append([f"{i} (group {bucket['group']}, {bucket['device']})", bucket["dtype"], str(bucket["tensors"]),
                     f"{bucket['elements']:,}", str(summary.get("kernels_expected", "-")),
                     str(summary.get("compile_seconds", "-")), folder.name if folder else "(eager)"])
    return _table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "dump":
            out = Path(args.out)
            print(run(args, out))
            print(f"\ngraph files written under {out.resolve()}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                print(run(args, Path(tmp)))
    except (ValueError, TypeError) as e:  # the optimizer's own argument errors
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
