"""python -m npu_optim_compile: see what the optimizer compiles for a model.

    python -m npu_optim_compile explain            # the default model, a table
    python -m npu_optim_compile explain --tensors 1000 --elements 4000000 \\
        --dtypes float32,bfloat16 --momentum 0.9 --centered
    python -m npu_optim_compile dump --out graphs/ # the same, and keep every file
    python -m npu_optim_compile dry-run train.py   # run a script with torchair, no NPU

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
from ._validation import check_dump_dir

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
    _add_dry_run(commands)
    return parser


class UsageError(Exception):
    """A bad command-line value: printed as one ``error:`` line, exit status 2."""


def _add_dry_run(commands) -> None:
    """``dry-run script.py [args]``: run a script under ascend_dry_run() (``_dry_run.py``)."""
    sub = commands.add_parser("dry-run", help="run a script with torchair's real GE conversion, no NPU needed")
    sub.add_argument("--torch-npu", default=None, help="a torch_npu wheel or folder (default: download once)")
    sub.add_argument("--dump", default=None, help="also write each GE graph there (.pbtxt)")
    sub.add_argument("script", help="the Python script to run")
    sub.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")


def _model(tensors: int, elements: int, dtypes: list[torch.dtype]) -> list[torch.nn.Parameter]:
    if tensors < 1 or elements < tensors:
        raise UsageError(f"need 1 <= --tensors <= --elements, got {tensors} tensors, {elements} elements")
    base, extra = divmod(elements, tensors)
    return [
        torch.nn.Parameter(torch.randn(base + (i < extra), dtype=dtypes[i % len(dtypes)]))
        for i in range(tensors)
    ]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.strip(), None)
    if not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise UsageError(f"--dtypes: unknown floating dtype {name!r} (try float32, bfloat16, float16, float64)")
    return dtype


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _check_out(value: str) -> Path:
    """``dump --out``: the folder, created if missing, or a UsageError naming ``--out``."""
    try:
        return Path(check_dump_dir(value, "--out"))
    except ValueError as e:  # check_dump_dir's wording names dump_dir; say it as the flag
        cause = e.__cause__
        reason = getattr(cause, "strerror", None) or cause or e
        raise UsageError(f"--out {value!r} is not a writable folder ({reason}); give a folder you can write to") from e


def run(args: argparse.Namespace, out: Path, keep: bool) -> str:
    """One step with graph dumps under ``out``; the table of this step's buckets. With
    ``keep`` the files stay, and a column names each bucket's folder."""
    from .optimizer import NpuFusedRMSprop

    params = _model(args.tensors, args.elements, [_dtype(d) for d in args.dtypes.split(",")])
    try:
        opt = NpuFusedRMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                              centered=args.centered, backend=args.backend, dump_dir=out)
    except (ValueError, TypeError, RuntimeError) as e:  # the optimizer's own argument errors, and
        raise UsageError(str(e)) from e  # a backend this machine cannot run (torchair without torch_npu)
    for p in params:
        p.grad = torch.randn_like(p)
    earlier = {f.parent for f in out.glob("*/summary.json")}  # an earlier run's folders: not this step's
    opt.step()
    graphs = {}
    for summary_file in sorted(out.glob("*/summary.json")):
        if summary_file.parent in earlier:
            continue
        summary = json.loads(summary_file.read_text())
        graphs[summary["graph"]] = (summary, summary_file.parent)
    header = ["bucket", "dtype", "tensors", "elements", "kernels", "compile (s)"]
    rows = [header + ["graph files"] if keep else header]
    for i, bucket in enumerate(opt.describe_buckets()):
        summary, folder = graphs.get(bucket["graph"], ({}, None))
        row = [f"{i} (group {bucket['group']}, {bucket['device']})", bucket["dtype"], str(bucket["tensors"]),
               f"{bucket['elements']:,}", str(summary.get("kernels_expected", "-")),
               str(summary.get("compile_seconds", "-"))]
        if keep:
            row.append(folder.name if folder else "(eager)")
        rows.append(row)
    return _table(rows)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "dry-run":
        from ._dry_run import run_script

        return run_script(args.script, args.args, torch_npu=args.torch_npu, dump_dir=args.dump)
    try:
        if args.command == "dump":
            out = _check_out(args.out)
            print(run(args, out, keep=True))
            print(f"\ngraph files written under {out.resolve()}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                print(run(args, Path(tmp), keep=False))
            print("\n(the graph files are not kept: `dump --out DIR` keeps them)")
    except UsageError as e:
        parser.exit(2, f"{parser.prog} {args.command}: error: {e}\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
