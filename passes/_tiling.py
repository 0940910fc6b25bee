"""Recognise lists of tensors that tile one base buffer completely and in order.

Matched pieces (each needs ``meta["val"]`` on its base, as every AOT graph has):

* ``getitem(split_with_sizes(base, sizes, dim), i)`` and ``getitem(split.Tensor(base, n, dim), i)``
  for a base of any rank: piece ``i`` has the base's shape with ``dim`` set to ``sizes[i]``;
* ``view``/``reshape``/``_unsafe_view`` of such a piece when the base is 1-D: the piece then
  has the viewed shape (a view of a 1-D tensor always exists and reads it in order);
* "virtual" pieces: the ``getitem`` outputs of a foreach op this pass already rewrote onto
  flat buffers.  They are registered with :meth:`TilingIndex.add_virtual` and only turned
  into real ``split_with_sizes`` views of the flat result (:meth:`TilingIndex.materialize`)
  where a consumer other than a fused op or a collapsed ``cat`` still needs them.

A list of pieces is a :class:`Tiling` when all pieces come from one (base, dim, sizes),
their indices are 0, 1, ..., and none is missing.  An elementwise op applied to every piece
then equals the op applied once to the base, split the same way (bit for bit wherever the
kernel computes each element the same way wherever it sits: not quite so for a few bf16/fp16
CPU kernels, see ``tests/passes/test_lowering.py``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence

import torch
from torch.fx import Node

from ._lowering import Emitter

aten = torch.ops.aten

_SPLITS = (aten.split_with_sizes.default, aten.split.Tensor)
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)

Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Tiling:
    """``base`` split along ``dim`` into ``sizes``; piece ``i`` is consumed with ``shapes[i]``."""

    base: Node
    base_shape: Shape
    dim: int
    sizes: tuple[int, ...]
    shapes: tuple[Shape, ...]

    def natural_shape(self, index: int) -> Shape:
        shape = list(self.base_shape)
        shape[self.dim] = self.sizes[index]
        return tuple(shape)

    def is_natural(self) -> bool:
        return all(s == self.natural_shape(i) for i, s in enumerate(self.shapes))

    def layout(self) -> tuple[Shape, int, tuple[int, ...], tuple[Shape, ...]]:
        """Everything but the base: equal layouts pair the pieces element by element."""
        return (self.base_shape, self.dim, self.sizes, self.shapes)


@dataclasses.dataclass(frozen=True)
class _Piece:
    tiling: Tiling  # shapes holds natural shapes, except for virtual pieces
    index: int
    shape: Shape


def _static_shape(node: Node) -> Shape | None:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return None
    if not all(isinstance(d, int) for d in val.shape):
        return None
    return tuple(val.shape)


def _split_sizes(split: Node, base_shape: Shape) -> tuple[int, tuple[int, ...]] | None:
    args = list(split.args) + [None] * 3
    dim = split.kwargs.get("dim", args[2] if args[2] is not None else 0)
    if not isinstance(dim, int) or not base_shape:
        return None
    dim %= len(base_shape)
    if split.target is aten.split_with_sizes.default:
        sizes = split.kwargs.get("split_sizes", args[1])
        if not all(isinstance(s, int) for s in sizes):
            return None
        return dim, tuple(sizes)
    step = split.kwargs.get("split_size", args[1])
    if not isinstance(step, int) or step <= 0:
        return None
    length = base_shape[dim]
    return dim, tuple(min(step, length - start) for start in range(0, length, step)) or (0,)


class TilingIndex:
    """Finds tilings in a graph and remembers the virtual tilings of rewritten foreach ops."""

    def __init__(self) -> None:
        self._virtual: dict[Node, _Piece] = {}
        self._results: dict[Node, Tiling] = {}  # rewritten foreach node -> its flat result
        self.fresh_bases: set[Node] = set()  # flat results the pass created

    # -- matching -----------------------------------------------------------------------
    def _piece(self, node: Node) -> _Piece | None:
        if not isinstance(node, Node):
            return None
        if node in self._virtual:
            return self._virtual[node]
        if node.op != "call_function":
            return None
        if node.target is operator.getitem:
            split, index = node.args
            if not (isinstance(split, Node) and split.target in _SPLITS and isinstance(index, int)):
                return None
            base = split.args[0]
            base_shape = _static_shape(base)
            parsed = _split_sizes(split, base_shape) if base_shape is not None else None
            if parsed is None:
                return None
            dim, sizes = parsed
            if sum(sizes) != base_shape[dim] or not 0 <= index < len(sizes):
                return None
            tiling = Tiling(base, base_shape, dim, sizes, ())
            return _Piece(tiling, index, tiling.natural_shape(index))
        if node.target in _VIEWS:
            inner = self._piece(node.args[0])
            shape = _static_shape(node)
            if inner is None or shape is None or len(inner.tiling.base_shape) != 1:
                return None
            return _Piece(inner.tiling, inner.index, shape)
        return None

    def match(self, nodes: Sequence[Node]) -> Tiling | None:
        """The tiling that ``nodes`` form, in order, or None."""
        pieces = [self._piece(n) for n in nodes]
        if not pieces or any(p is None for p in pieces):
            return None
        first = pieces[0].tiling
        key = (first.base, first.dim, first.sizes)
        if len(pieces) != len(first.sizes):
            return None
        for i, p in enumerate(pieces):
            if (p.tiling.base, p.tiling.dim, p.tiling.sizes) != key or p.index != i:
                return None
        return Tiling(first.base, first.base_shape, first.dim, first.sizes, tuple(p.shape for p in pieces))

    # -- virtual tilings ----------------------------------------------------------------
    def add_virtual(self, foreach: Node, result: Tiling) -> None:
        """Registers the ``getitem`` users of ``foreach`` as pieces of ``result``."""
        self._results[foreach] = result
        self.fresh_bases.add(result.base)
        for user in foreach.users:
            if user.target is operator.getitem and isinstance(user.args[1], int):
                i = user.args[1]
                self._virtual[user] = _Piece(result, i, result.shapes[i])

    def materialize(self, *, target: str) -> int:
        """Erases rewritten foreach nodes; gives remaining consumers real per-tensor views.

        Returns the number of pieces materialised.  Must run after every rewrite, so that
        fused ops and collapsed ``cat`` nodes no longer use the virtual pieces.
        """
        made = 0
        for foreach, result in reversed(list(self._results.items())):
            graph = foreach.graph
            getitems = [u for u in foreach.users if u.target is operator.getitem]
            needed = [g for g in getitems if g.users]
            if needed:
                made += len(needed)
                with graph.inserting_after(result.base):
                    views = _piece_views(Emitter(graph, target, foreach), result, needed)
                for g, view in zip(needed, views):
                    g.replace_all_uses_with(view)
            for g in getitems:
                graph.erase_node(g)
            if not foreach.users:
                graph.erase_node(foreach)
        self._results.clear()
        self._virtual.clear()
        return made


def _piece_views(e: Emitter, tiling: Tiling, getitems: Sequence[Node]) -> list[Node]:
    """Per-tensor views of ``tiling.base`` for the given getitem nodes (in graph order)."""
    graph = e.graph
    indices = [g.args[1] for g in getitems]
    if len(tiling.sizes) == 1 and tiling.shapes[0] == tiling.base_shape:
        return [tiling.base for _ in indices]
    # Nodes are inserted after the base in reverse order of need, so each lands before
    # its users: split first, then getitems, then views.
    split = e.call(aten.split_with_sizes.default, tiling.base, list(tiling.sizes), tiling.dim)
    out = []
    for i in indices:
        with graph.inserting_after(split):
            piece = e.call(operator.getitem, split, i)
        if tiling.shapes[i] != tiling.natural_shape(i):
            with graph.inserting_after(piece):
                piece = e.call(aten.view.default, piece, list(tiling.shapes[i]))
        out.append(piece)
    return out
