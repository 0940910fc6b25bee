"""Regenerate ``passes/ge_allowlist.json`` from torch_npu's wheel (a developer tool).

Not part of the installed package: it downloads a wheel with pip. The list it writes
ships with the package and is read by :mod:`npu_optim_compile.passes.ge_ops`. The
wheel's source files are read as text from the zip with :mod:`ast`; nothing from the
wheel is imported or extracted::

    python tools/ge_allowlist.py            # download once, regenerate
    python tools/ge_allowlist.py --check    # exit 1 if the committed file is stale

Counting rule: every ``@register_fx_node_ge_converter(torch.ops.<ns>.<op>.<overload>)``
(or ``getattr(torch.ops.<ns>.<op>, "<overload>", None)``) on a module-level function
in ``ge_converter/aten/*.py`` and ``ge_converter/prims/*.py`` is a registration; it is
a *stub* when the function body (after its docstring) is one ``raise`` statement, else
it is *working*.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

from npu_optim_compile._torchair_source import (  # the wheel cache is shared with ascend_dry_run()
    TORCH_NPU_VERSION,
    WheelUnavailableError,
    default_cache_dir,
    fetch_torch_npu_wheel,
)
from npu_optim_compile.passes.ge_ops import ALLOWLIST_PATH, GE_NAMESPACES

__all__ = [
    "TORCH_NPU_VERSION",
    "WheelUnavailableError",
    "default_cache_dir",
    "fetch_torch_npu_wheel",
    "read_wheel_text",
    "scan_converters",
    "build_allowlist",
    "main",
]

CONVERTER_DIR = "torch_npu/dynamo/torchair/_ge_concrete_graph/ge_converter"


def read_wheel_text(wheel: str | os.PathLike[str], prefix: str) -> dict[str, str]:
    """Return {archive path: text} of the ``.py`` files under ``prefix`` in the wheel.

    Read from the zip directly: unpacking a wheel's ``dist-info`` into a directory on
    ``sys.path`` (e.g. the current directory) makes ``import torch`` autoload it.
    """
    with zipfile.ZipFile(wheel) as zf:
        return {
            name: zf.read(name).decode("utf-8")
            for name in sorted(zf.namelist())
            if name.startswith(prefix) and name.endswith(".py")
        }


def _registered_target(decorator: ast.expr) -> str | None:
    """``"aten.mul.Tensor"`` for ``@register_fx_node_ge_converter(torch.ops.aten.mul.Tensor)``."""
    if not (
        isinstance(decorator, ast.Call)
        and isinstance(decorator.func, ast.Name)
        and decorator.func.id == "register_fx_node_ge_converter"
        and decorator.args
    ):
        return None
    arg = decorator.args[0]
    if (  # getattr(torch.ops.aten.rand, "names", None)
        isinstance(arg, ast.Call)
        and isinstance(arg.func, ast.Name)
        and arg.func.id == "getattr"
        and len(arg.args) >= 2
        and isinstance(arg.args[1], ast.Constant)
    ):
        dotted = f"{ast.unparse(arg.args[0])}.{arg.args[1].value}"
    else:
        dotted = ast.unparse(arg)
    if not dotted.startswith("torch.ops."):
        return None  # e.g. torch.sym_sqrt, operator.mul: not aten/prims overloads
    return dotted[len("torch.ops.") :]


def _is_stub(func: ast.FunctionDef) -> bool:
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # docstring
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def scan_converters(sources: dict[str, str]) -> tuple[frozenset[str], frozenset[str]]:
    """Return (working, stubs) from {path: text} of converter files (see module doc)."""
    working: dict[str, bool] = {}
    for text in sources.values():
        for node in ast.parse(text).body:
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                target = _registered_target(decorator)
                if target is not None:
                    working[target] = not _is_stub(node)  # last registration wins
    return (
        frozenset(t for t, ok in working.items() if ok),
        frozenset(t for t, ok in working.items() if not ok),
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_allowlist(wheel: str | os.PathLike[str]) -> dict[str, Any]:
    """Build the JSON document of ``ge_allowlist.json`` from a torch_npu wheel."""
    wheel = Path(wheel)
    sources: dict[str, str] = {}
    for ns in GE_NAMESPACES:
        sources.update(read_wheel_text(wheel, f"{CONVERTER_DIR}/{ns}/"))
    if not sources:
        raise ValueError(f"{wheel.name} has no {CONVERTER_DIR}/: not a torch_npu wheel with torchair?")
    version_py = read_wheel_text(wheel, "torch_npu/version.py").get("torch_npu/version.py", "")
    found = dict(re.findall(r"^(__version__|git_version)\s*=\s*'([^']*)'", version_py, re.M))
    working, stubs = scan_converters(sources)
    return {
        "comment": "Generated by `python tools/ge_allowlist.py`; do not edit. "
        "ops: aten/prims overloads whose torchair GE converter is not a bare `raise` stub.",
        "torch_npu_version": found.get("__version__"),
        "torch_npu_git_version": found.get("git_version"),
        "wheel": wheel.name,
        "wheel_sha256": _file_sha256(wheel),
        "source": f"{CONVERTER_DIR}/{{{','.join(GE_NAMESPACES)}}}/*.py",
        "counts": {
            "files": len(sources),
            "registered": len(working) + len(stubs),
            "working": len(working),
            "stubs": len(stubs),
        },
        "ops": sorted(working),
        "stubs": sorted(stubs),
    }


def _dumps(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=1) + "\n"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python tools/ge_allowlist.py",
        description="Regenerate (or --check) the GE converter allow-list from the torch_npu wheel.",
    )
    parser.add_argument("--wheel", type=Path, help="a torch_npu wheel (default: download once with pip)")
    parser.add_argument("--output", type=Path, default=ALLOWLIST_PATH, help="JSON file to write/check")
    parser.add_argument("--check", action="store_true", help="exit 1 if --output differs; write nothing")
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help=f"download cache (default {default_cache_dir()})"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    args = _parse_args(argv)
    try:
        wheel = args.wheel or fetch_torch_npu_wheel(args.cache_dir)
    except WheelUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    document = build_allowlist(wheel)
    if not args.check:
        args.output.write_text(_dumps(document), encoding="utf-8")
        print(f"wrote {args.output}: {len(document['ops'])} ops from {document['wheel']}")
        return 0
    try:
        committed = json.loads(args.output.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"error: cannot read {args.output}: {e}", file=sys.stderr)
        return 1
    stale = [k for k in ("torch_npu_version", "ops", "stubs") if committed.get(k) != document[k]]
    if stale:
        added = sorted(set(document["ops"]) - set(committed.get("ops", [])))
        removed = sorted(set(committed.get("ops", [])) - set(document["ops"]))
        print(
            f"{args.output} is stale ({', '.join(stale)} differ; +{added[:10]} -{removed[:10]}). "
            f"Regenerate: python tools/ge_allowlist.py --wheel {wheel}",
            file=sys.stderr,
        )
        return 1
    if committed.get("wheel_sha256") != document["wheel_sha256"]:
        print(f"note: same ops, read from another wheel ({document['wheel']})", file=sys.stderr)
    print(f"{args.output} is up to date ({len(document['ops'])} ops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
