"""Inductor adapter: the foreach fusion pass as a ``CustomGraphPass``.

Install it per compile, never through the process-global inductor config::

    step = torch.compile(fn, options={"post_grad_custom_pre_pass": ForeachFusionPass()})

``uuid()`` hashes this package's source files and the options, so inductor's FX graph
cache stays correct (a pass without a uuid disables the cache).  On a cache hit inductor
does not call the pass at all, so :attr:`ForeachFusionPass.history` stays empty then.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from .foreach_fusion import FusionOptions, FusionStats, fuse_foreach_ops

_SOURCES = tuple(str(p) for p in sorted(Path(__file__).parent.glob("*.py")))


class ForeachFusionPass(CustomGraphPass):
    """Runs :func:`fuse_foreach_ops` on each post-grad graph inductor compiles.

    Args:
        options: pass options; ``target`` is always set to ``"inductor"``.
    """

    def __init__(self, options: FusionOptions | None = None) -> None:
        self.options = dataclasses.replace(options or FusionOptions(), target="inductor")
        self.history: list[FusionStats] = []  # one entry per graph the pass rewrote

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.history.append(fuse_foreach_ops(graph, options=self.options))

    def uuid(self) -> str:
        return get_hash_for_files(_SOURCES, extra=repr(self.options)).hex()
