"""Graph dumps: what was traced, what our pass changed, what the backend built.

Turned on by ``NpuFusedRMSprop(dump_dir=...)`` or, for code you cannot edit, by the
environment variable ``NPU_OPTIM_COMPILE_DUMP_DIR``. Each compiled graph gets a folder
``<dump_dir>/<step name>-<pid>-<n>/`` with:

- ``dynamo_graph.py``: the graph Dynamo traced (torch-level ops);
- ``aten_before_fusion.py`` / ``aten_after_fusion.py``: the functional aten graph the
  backend's post-grad passes receive, and the same graph after our foreach-fusion pass;
- ``summary.json``: backend, options, the optimizer's buckets (tensors and elements per
  bucket), ops before and after the pass, kernels expected, compile time;
- the backend's own files: ``inductor_output_code.py`` (the generated kernels) for
  inductor; torchair's ``debug.graph_dump`` files (GE ``.pbtxt`` or ACL-graph ``.py``);
- ``*.svg`` drawings of the graphs when ``pydot`` and graphviz are installed.

The aten graph after fusion is produced by running our pass on a copy of the graph, so
every file is written on an inductor FX-graph-cache hit too (the cache skips the
backend's passes, not our dump).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ._validation import check_dump_dir

__all__ = ["DUMP_ENV", "GraphDump", "bucket_context", "resolve_dump_dir"]

#: The environment variable that turns dumps on without touching the code.
DUMP_ENV = "NPU_OPTIM_COMPILE_DUMP_DIR"

_counter = itertools.count()
_context = threading.local()


def resolve_dump_dir(explicit: str | os.PathLike[str] | None) -> str:
    """The dump folder: the explicit option, else the environment variable, else "".

    The folder is created and checked now, so a bad one fails here with an error that
    names ``dump_dir`` or the variable, never later inside a compile."""
    if explicit is not None:
        value, source = os.fspath(explicit), "dump_dir"
    else:
        value, source = os.environ.get(DUMP_ENV, ""), DUMP_ENV
    if not value:
        return ""
    return check_dump_dir(os.path.abspath(value), source)


@contextlib.contextmanager
def bucket_context(description: list[dict[str, Any]]) -> Iterator[None]:
    """Tell a compile that happens inside this block which buckets it serves."""
    previous = getattr(_context, "buckets", None)
    _context.buckets = description
    try:
        yield
    finally:
        _context.buckets = previous


def _readable(gm: torch.fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=True, include_device=True)


def _count_ops(graph: torch.fx.Graph) -> int:
    import operator

    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem)


def _inductor_kernels(source: str) -> int:
    """Kernels in inductor's output code: C++ (``cpp_pybinding``) and Triton ones."""
    return len(re.findall(r"async_compile\.(?:cpp_pybinding|cpp|triton)\(", source))


class GraphDump:
    """The folder of one compiled graph, and the writers for its files."""

    def __init__(self, root: str, name: str) -> None:
        self.path = Path(root) / f"{name}-{os.getpid()}-{next(_counter)}"
        self.path.mkdir(parents=True, exist_ok=True)
        self.summary: dict[str, Any] = {"graph": name}
        buckets = getattr(_context, "buckets", None)
        if buckets is not None:
            self.summary["buckets"] = buckets

    def write(self, filename: str, text: str) -> Path:
        target = self.path / filename
        target.write_text(text)
        return target

    def _svg(self, gm: torch.fx.GraphModule, stem: str) -> None:
        try:  # optional: pydot + the graphviz binaries
            from torch.fx.passes.graph_drawer import FxGraphDrawer

            svg = FxGraphDrawer(gm, stem).get_dot_graph().create_svg()
        except Exception:  # noqa: BLE001 - drawings are a bonus, never a failure
            return
        (self.path / f"{stem}.svg").write_bytes(svg)

    def dynamo_graph(self, gm: torch.fx.GraphModule) -> None:
        self.write("dynamo_graph.py", _readable(gm))
        self._svg(gm, "dynamo_graph")

    def aten_graphs(self, gm: torch.fx.GraphModule, run_pass) -> None:
        """Write ``gm`` and a copy of it after ``run_pass(graph) -> FusionStats``."""
        self.write("aten_before_fusion.py", _readable(gm))
        self._svg(gm, "aten_before_fusion")
        after = copy.deepcopy(gm)
        stats = run_pass(after.graph)
        after.recompile()
        self.write("aten_after_fusion.py", _readable(after))
        self._svg(after, "aten_after_fusion")
        self.summary.update(
            ops_before_fusion=_count_ops(gm.graph),
            ops_after_fusion=_count_ops(after.graph),
            foreach_ops_rewritten=getattr(stats, "foreach_rewritten", None),
        )

    def inductor_code(self, source: str | None) -> None:
        if source:
            self.write("inductor_output_code.py", source)
            self.summary["kernels_expected"] = _inductor_kernels(source)

    def finish(self, **fields: Any) -> None:
        self.summary.update(fields)
        self.write("summary.json", json.dumps(self.summary, indent=2, default=str) + "\n")
