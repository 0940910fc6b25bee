"""The ``foreach_fusion`` pass: horizontal fusion of ``aten._foreach_*`` ops in an FX graph.

Runs on the functional post-AOT aten graph (inductor's ``post_grad_custom_pre_pass`` or
torchair's).  In graph order:

1. A supported foreach op whose tensor-list operands are all complete, ordered tilings of
   flat buffers with one layout (see :mod:`._tiling`) becomes one pointwise op chain on
   the bases.  Its outputs stay a *virtual* tiling of the flat result, so a chain of
   foreach ops stays on the flat buffers.
2. ``cat`` of a complete tiling along its split dim becomes the base (or a ``clone`` of it
   where the base is not a fresh result of this pass: an input may be mutated later).
3. Any other supported foreach op (unrelated tensors, one-tensor lists, scalar lists with
   different values) is lowered to per-tensor aten ops, which the backend fuses vertically.
4. Virtual pieces that some other consumer still reads become ``split_with_sizes`` views
   of the flat result; dead nodes are removed and the graph is linted.

Unsupported foreach overloads are left alone (reason logged at DEBUG on the logger
``npu_optim_compile.passes``).  Emitted ops: :data:`EMITTED_OPS`.

Why unrelated tensors are lowered per tensor rather than grouped (``cat`` -> op -> split):
grouping pays one ``cat`` per input list and one ``copy_`` per tensor back, and inductor
compiles the 200-way ``cat`` and split slowly. Measured with real inductor on CPU (torch
2.13, one RMSprop step over 200 fp32 tensors of mixed shapes, ``benchmarks/bench_grouping.py``;
the three runs and their conditions are in ``benchmarks/README.md``), grouping lost on
compile time and on step time in every run, while per-tensor lowering compiled about as
fast as inductor's own foreach lowering and stepped as fast or faster; so this pass does
not group unrelated tensors. (On CUDA inductor turns foreach ops into combo kernels, one
launch for many tensors; per-tensor lowering was not measured there.)
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import time

import torch
from torch.fx import Graph, Node

from ._lowering import (
    TARGETS,
    Emitter,
    ForeachCall,
    Target,
    Unsupported,
    is_foreach,
    lower_element,
    parse_foreach,
)
from ._tiling import Tiling, TilingIndex

aten = torch.ops.aten
log = logging.getLogger("npu_optim_compile.passes")

PASS_NAME = "foreach_fusion"


@dataclasses.dataclass(frozen=True)
class FusionOptions:
    """Knobs of the pass.  Every field changes what the pass emits (and the inductor uuid).

    Args:
        enabled: False leaves every graph untouched (the off switch).
        collapse_tilings: map foreach ops over complete tilings, and ``cat`` of them, onto
            the flat base buffers.
        lower_per_tensor: lower the remaining supported foreach ops to per-tensor ops.
        target: ``"torchair"`` (dtype casts as ``aten._to_copy``) or ``"inductor"``
            (``prims.convert_element_type``, which inductor lowers after decompositions).
    """

    enabled: bool = True
    collapse_tilings: bool = True
    lower_per_tensor: bool = True
    target: Target = "torchair"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"FusionOptions.target must be one of {TARGETS}, got {self.target!r}")


@dataclasses.dataclass
class FusionStats:
    """What one run of the pass did.  ``ops`` count ``call_function`` nodes but ``getitem``."""

    name: str = PASS_NAME
    enabled: bool = True
    ops_before: int = 0
    ops_after: int = 0
    foreach_before: int = 0
    foreach_after: int = 0
    foreach_fused: int = 0  # foreach ops mapped onto flat buffers (tilings)
    foreach_lowered: int = 0  # foreach ops lowered to per-tensor ops
    cats_collapsed: int = 0
    pieces_materialized: int = 0
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def foreach_rewritten(self) -> int:
        return self.foreach_fused + self.foreach_lowered

    @property
    def changed(self) -> bool:
        return bool(self.foreach_rewritten or self.cats_collapsed)


_VIEWISH = frozenset(
    {
        operator.getitem,
        aten.split_with_sizes.default,
        aten.split.Tensor,
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.cat.default,
    }
)


def _erase_dead_views(graph: Graph) -> None:
    """Removes the splits, views, cats and functional foreach ops nobody reads any more.

    Narrower than ``graph.eliminate_dead_code()``: nodes of other kinds (a backend's scope
    markers, say) are never touched, dead or not.
    """
    for node in reversed(list(graph.nodes)):
        if node.users or node.op != "call_function":
            continue
        functional_foreach = is_foreach(node) and not node.target._schema.is_mutable
        if node.target in _VIEWISH or functional_foreach:
            graph.erase_node(node)


def _count(graph: Graph) -> tuple[int, int]:
    ops = [n for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    return len(ops), sum(1 for n in ops if is_foreach(n))


def fuse_foreach_ops(graph: Graph, *, options: FusionOptions | None = None) -> FusionStats:
    """Rewrites ``graph`` in place (see the module docstring) and returns what it did."""
    options = options or FusionOptions()
    start = time.perf_counter()
    stats = FusionStats(enabled=options.enabled)
    stats.ops_before, stats.foreach_before = _count(graph)
    if options.enabled:
        _Rewriter(graph, options, stats).run()
    stats.ops_after, stats.foreach_after = _count(graph)
    stats.seconds = time.perf_counter() - start
    log.debug("%s: %s", PASS_NAME, stats)
    return stats


class _Rewriter:
    def __init__(self, graph: Graph, options: FusionOptions, stats: FusionStats) -> None:
        self.graph = graph
        self.options = options
        self.stats = stats
        self.index = TilingIndex()

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.cat.default and self.options.collapse_tilings:
                self._collapse_cat(node)
            elif is_foreach(node):
                self._rewrite_foreach(node)
        self.stats.pieces_materialized = self.index.materialize(target=self.options.target)
        if self.stats.changed:
            _erase_dead_views(self.graph)
        self.graph.lint()

    def _reject(self, node: Node, reason: str) -> None:
        log.debug("%s: left %s (%s) alone: %s", PASS_NAME, node.name, node.target, reason)
        self.stats.rejected[reason] = self.stats.rejected.get(reason, 0) + 1

    # -- foreach ops ----------------------------------------------------------------------
    def _rewrite_foreach(self, node: Node) -> None:
        try:
            call = parse_foreach(node)
        except Unsupported as exc:
            return self._reject(node, str(exc))
        if any(u.target is not operator.getitem for u in node.users):
            return self._reject(node, "result list used other than through getitem")
        if self.options.collapse_tilings:
            tiling, why = self._common_tiling(call)
            if tiling is not None:
                why = self._fuse(call, tiling)
                if not why:
                    return
            log.debug("%s: %s not fused on flat buffers: %s", PASS_NAME, node.name, why)
        if self.options.lower_per_tensor:
            self._lower_per_tensor(call)
        else:
            self._reject(node, "not a tiling and per-tensor lowering is off")

    def _common_tiling(self, call: ForeachCall) -> tuple[Tiling | None, str]:
        if call.has_scalar_list:
            return None, "scalar list with different values per tensor"
        tilings = [self.index.match(o.value) for o in call.lists]
        if any(t is None for t in tilings):
            return None, "a list operand is not a complete, ordered tiling of one buffer"
        if len({t.layout() for t in tilings}) != 1:
            return None, "list operands tile buffers with different layouts"
        return tilings[0], ""

    def _fuse(self, call: ForeachCall, tiling: Tiling) -> str:
        """Emits ``call`` on the flat bases; returns why not ("" when done)."""
        bases = {o.name: self.index.match(o.value).base for o in call.lists}
        with self.graph.inserting_before(call.node):
            e = Emitter(self.graph, self.options.target, call.node)
            try:
                flat = lower_element(e, call, bases, None)
            except Unsupported as exc:
                e.rollback()
                return str(exc)
        self.index.add_virtual(call.node, dataclasses.replace(tiling, base=flat))
        self.stats.foreach_fused += 1
        return ""

    def _lower_per_tensor(self, call: ForeachCall) -> None:
        node = call.node
        with self.graph.inserting_before(node):
            e = Emitter(self.graph, self.options.target, node)
            try:
                outs = [
                    lower_element(e, call, {o.name: o.value[i] for o in call.lists}, i)
                    for i in range(call.length)
                ]
            except Unsupported as exc:
                e.rollback()
                return self._reject(node, str(exc))
        for user in list(node.users):
            user.replace_all_uses_with(outs[user.args[1]])
            self.graph.erase_node(user)
        self.graph.erase_node(node)
        self.stats.foreach_lowered += 1

    # -- cat ------------------------------------------------------------------------------
    def _collapse_cat(self, node: Node) -> None:
        tensors = node.kwargs.get("tensors", node.args[0])
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        tiling = self.index.match(tensors)
        if tiling is None:
            return
        if not isinstance(dim, int) or dim % len(tiling.base_shape) != tiling.dim:
            return self._reject(node, "cat along another dim than the tiling's split")
        if not tiling.is_natural():
            return self._reject(node, "cat of reshaped pieces")
        base = tiling.base
        val = base.meta.get("val")
        if base in self.index.fresh_bases and isinstance(val, torch.Tensor) and val.is_contiguous():
            replacement = base
        else:  # an input (or a view of one) may be mutated by a later copy_
            with self.graph.inserting_before(node):
                e = Emitter(self.graph, self.options.target, node)
                replacement = e.call(aten.clone.default, base, memory_format=torch.contiguous_format)
        node.replace_all_uses_with(replacement)
        self.graph.erase_node(node)
        self.stats.cats_collapsed += 1
