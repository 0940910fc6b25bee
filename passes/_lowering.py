"""Lower one element of a functional ``aten._foreach_*`` op to plain aten pointwise ops.

Matched: the functional (not in-place) overloads in :data:`SUPPORTED_FOREACH_OPS`, as they
appear in a post-AOT graph.  :func:`parse_foreach` reads a foreach node through its schema
into list operands (``Tensor[]``), scalars (``number``), scalar lists (``number[]``) and
0-d tensor scalars (``Tensor``).  A scalar list whose values are all equal is read as one
scalar, so it can still be applied to a whole flat buffer.

Emitted: only the overloads in :data:`EMITTED_OPS` (every one has a torchair GE converter
and an inductor lowering) plus ``operator.getitem``.  Scalars are passed to the ``.Tensor``
overloads, as AOT itself does (``aten.sub.Scalar`` has no GE converter).  Dtype casts are
``aten._to_copy`` for torchair and ``prims.convert_element_type`` for inductor, which has
no lowering for ``_to_copy`` after its decompositions (:data:`INDUCTOR_EMITTED_OPS`).

Exactness (eager CPU, checked by ``tests/passes/test_lowering.py``):

* one-op lowerings (``add``/``sub`` with ``alpha``, ``mul``, ``div``, ``sqrt``, ...) call
  the same aten kernel as the foreach slow path: bit-exact per tensor in every dtype.
  ``alpha`` is kept as ``add.Tensor(a, b, alpha=k)``: the CPU kernel computes
  ``fma(b, k, a)``, which a ``mul`` then ``add`` does not reproduce (measured: ~2% of fp32
  elements differ).  Applied to a whole flat buffer instead of its pieces, bf16/fp16
  ``add``/``sub`` with ``alpha`` and ``rsqrt`` differ by up to one ulp: those CPU kernels
  round their vector body and their scalar tail differently.
* composites keep the eager CPU op order: ``addcmul`` is ``s + (v*t1)*t2``, ``addcdiv``
  is ``s + (v*t1)/t2``, ``lerp`` is ``a + w*(b-a)`` if ``|w| < 0.5`` else
  ``b - (b-a)*(1-w)``; bf16/fp16 are computed in fp32 and rounded once, as the kernels'
  opmath does.  ``addcdiv`` is bit-exact.  ``addcmul`` and ``lerp`` are only allclose in
  fp32/fp64 (and fp16): the vectorised CPU kernels use a fused multiply-add (one
  rounding), which separate ``mul``/``add`` ops cannot express.
* for ``target="inductor"`` ``addcmul``/``addcdiv`` follow inductor's own lowering of the
  foreach op instead, ``s + v*(t1 op t2)``, so a graph compiled with the pass computes what
  inductor computes without it (bit for bit on the CPU: ``tests/passes/test_inductor.py``).
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch.fx import Graph, Node

aten = torch.ops.aten
prims = torch.ops.prims

Target = Literal["torchair", "inductor"]
TARGETS: tuple[str, ...] = ("torchair", "inductor")

#: Every overload the pass may emit for torchair: each has a working GE converter in torch_npu
#: 2.13.0's torchair (listed in ``ge_allowlist.json``, see ``ge_ops.py``; checked by
#: ``tests/torchair/test_ge_allowlist.py``).
EMITTED_OPS: frozenset[torch._ops.OpOverload] = frozenset(
    {
        aten.add.Tensor,
        aten.sub.Tensor,
        aten.mul.Tensor,
        aten.div.Tensor,
        aten.sqrt.default,
        aten.rsqrt.default,
        aten.neg.default,
        aten.reciprocal.default,
        aten.abs.default,
        aten.maximum.default,
        aten.pow.Tensor_Scalar,
        aten._to_copy.default,
        aten.clone.default,
        aten.cat.default,
        aten.split_with_sizes.default,
        aten.view.default,
    }
)
#: The same for inductor: dtype casts are ``prims.convert_element_type`` instead.
INDUCTOR_EMITTED_OPS: frozenset[torch._ops.OpOverload] = (
    EMITTED_OPS - {aten._to_copy.default}
) | {prims.convert_element_type.default}

_LIST, _SCALAR, _SCALAR_LIST, _TENSOR_SCALAR = "list", "scalar", "scalar_list", "tensor_scalar"
_REDUCED = (torch.bfloat16, torch.float16)


def _overloads(name: str, *overloads: str) -> set[torch._ops.OpOverload]:
    packet = getattr(aten, f"_foreach_{name}")
    return {getattr(packet, o) for o in overloads}


#: Functional foreach overloads this module lowers.  ``addcmul``/``addcdiv`` ``.Tensor``
#: (a 1-D tensor of per-list scalars) and ``lerp.List`` are not lowered (left alone).
SUPPORTED_FOREACH_OPS: frozenset[torch._ops.OpOverload] = frozenset(
    _overloads("add", "List", "Scalar", "ScalarList", "Tensor")
    | _overloads("sub", "List", "Scalar", "ScalarList")
    | _overloads("mul", "List", "Scalar", "ScalarList", "Tensor")
    | _overloads("div", "List", "Scalar", "ScalarList", "Tensor")
    | _overloads("addcmul", "Scalar", "ScalarList")
    | _overloads("addcdiv", "Scalar", "ScalarList")
    | _overloads("lerp", "Scalar", "ScalarList")
    | _overloads("pow", "Scalar", "ScalarList")
    | _overloads("maximum", "List")
    | {getattr(aten, f"_foreach_{u}").default for u in ("sqrt", "rsqrt", "neg", "reciprocal", "abs")}
)


def is_foreach(node: Node) -> bool:
    """True for any ``aten._foreach_*`` call (supported or not)."""
    return (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.__name__.startswith("_foreach_")
    )


class Unsupported(Exception):
    """Raised while lowering; the message is the reason logged for leaving a node alone."""


@dataclasses.dataclass(frozen=True)
class Operand:
    name: str
    kind: str  # _LIST, _SCALAR, _SCALAR_LIST, _TENSOR_SCALAR
    value: Any  # list[Node] | number | list[number] | Node


@dataclasses.dataclass(frozen=True)
class ForeachCall:
    """A foreach node read through its schema."""

    node: Node
    name: str  # "add", "addcmul", ...
    operands: tuple[Operand, ...]
    alpha: Any  # the ``alpha`` kwarg, or 1
    length: int

    @property
    def lists(self) -> tuple[Operand, ...]:
        return tuple(o for o in self.operands if o.kind == _LIST)

    @property
    def has_scalar_list(self) -> bool:
        return any(o.kind == _SCALAR_LIST for o in self.operands)

    def element(self, tensors: dict[str, Node], index: int | None) -> list[Any]:
        """Positional arguments of element ``index``; list operands taken from ``tensors``."""
        args = []
        for o in self.operands:
            if o.kind == _LIST:
                args.append(tensors[o.name])
            elif o.kind == _SCALAR_LIST:
                if index is None:
                    raise Unsupported("scalar list with different values per tensor")
                args.append(o.value[index])
            else:
                args.append(o.value)
        return args


def _same_scalars(values: Sequence[Any]) -> bool:
    first = values[0]
    return all(type(v) is type(first) and repr(v) == repr(first) for v in values)


def parse_foreach(node: Node) -> ForeachCall:
    """Read a supported foreach node; raises :class:`Unsupported` with a reason otherwise."""
    op = node.target
    if op not in SUPPORTED_FOREACH_OPS:
        raise Unsupported(f"no lowering for {op}")
    schema_args = op._schema.arguments
    bound = dict(node.kwargs)
    for arg, value in zip(schema_args, node.args):
        bound[arg.name] = value
    operands, alpha, length = [], 1, None
    for arg in schema_args:
        if arg.name in bound:
            value = bound[arg.name]
        elif arg.has_default_value():
            value = arg.default_value
        else:
            raise Unsupported(f"missing argument {arg.name}")
        if arg.name == "alpha":
            alpha = value
            continue
        type_ = str(arg.type)
        if type_ == "List[Tensor]":
            kind = _LIST
            if not all(isinstance(v, Node) for v in value):
                raise Unsupported("tensor list holds a non-node")
            length = len(value) if length is None else length
            if len(value) != length:
                raise Unsupported("tensor lists of different lengths")
        elif type_ == "List[number]":
            kind = _SCALAR if value and _same_scalars(value) else _SCALAR_LIST
            value = value[0] if kind == _SCALAR else list(value)
        elif type_ == "number":
            kind = _SCALAR
        elif type_ == "Tensor":
            kind = _TENSOR_SCALAR
            val = value.meta.get("val") if isinstance(value, Node) else None
            if not isinstance(val, torch.Tensor) or val.dim() != 0:
                raise Unsupported("tensor scalar operand is not a 0-d tensor")
        else:
            raise Unsupported(f"argument {arg.name} of type {type_}")
        if kind != _LIST and _is_symbolic(value):
            raise Unsupported("symbolic scalar")
        operands.append(Operand(arg.name, kind, value))
    if not length:
        raise Unsupported("empty tensor list")
    name = op.__name__.split(".")[0][len("_foreach_"):]
    return ForeachCall(node, name, tuple(operands), alpha, length)


def _is_symbolic(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) for v in values)


def _val(arg: Any) -> Any:
    if isinstance(arg, Node):
        return arg.meta.get("val")
    if isinstance(arg, (list, tuple)):
        return type(arg)(_val(a) for a in arg)
    return arg


class Emitter:
    """Creates nodes at the graph's current insertion point and fills ``meta["val"]``.

    ``meta["val"]`` comes from running the op on the inputs' FakeTensors under their fake
    mode; it is left unset where an input has none (hand-built graphs without metadata).
    """

    def __init__(self, graph: Graph, target: Target, origin: Node | None = None) -> None:
        self.graph = graph
        self.target = target
        self.origin = origin
        self.nodes: list[Node] = []

    def call(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Node:
        node = self.graph.call_function(op, tuple(args), kwargs)
        self.nodes.append(node)
        if self.origin is not None and "stack_trace" in self.origin.meta:
            node.meta["stack_trace"] = self.origin.meta["stack_trace"]
        val = _fake_result(op, args, kwargs)
        if val is not None:
            node.meta["val"] = val
        return node

    def rollback(self) -> None:
        """Erases every node this emitter created (after a failed lowering)."""
        for node in reversed(self.nodes):
            self.graph.erase_node(node)
        self.nodes.clear()

    def cast(self, node: Node, dtype: torch.dtype) -> Node:
        if dtype_of(node) == dtype:
            return node
        if self.target == "inductor":
            return self.call(prims.convert_element_type.default, node, dtype)
        return self.call(aten._to_copy.default, node, dtype=dtype)


def _fake_result(op: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    vals = [_val(a) for a in args]
    kw = {k: _val(v) for k, v in kwargs.items()}
    flat = [v for v in torch.utils._pytree.tree_leaves((vals, kw)) if isinstance(v, torch.Tensor)]
    if any(v is None for v in torch.utils._pytree.tree_leaves(vals)) or not flat:
        return None
    mode = torch._guards.detect_fake_mode(flat)
    if mode is None:
        return None
    with mode:
        return op(*vals, **kw)


def dtype_of(node: Any) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _opmath(e: Emitter, tensors: Sequence[Node]) -> tuple[list[Node], Callable[[Node], Node]]:
    """Casts bf16/fp16 inputs of a composite to fp32 and returns the cast back."""
    dtypes = {dtype_of(t) for t in tensors}
    if len(dtypes) != 1 or None in dtypes:
        raise Unsupported("composite op over mixed or unknown dtypes")
    (dtype,) = dtypes
    if not dtype.is_floating_point:
        raise Unsupported(f"composite op over {dtype}")
    if dtype not in _REDUCED:
        return list(tensors), lambda r: r
    return [e.cast(t, torch.float32) for t in tensors], lambda r: e.cast(r, dtype)


def _alpha_op(op: torch._ops.OpOverload) -> Callable[..., Node]:
    def build(e: Emitter, a: Any, b: Any, *, alpha: Any = 1) -> Node:
        return e.call(op, a, b) if alpha == 1 else e.call(op, a, b, alpha=alpha)

    return build


def _binary(op: torch._ops.OpOverload) -> Callable[..., Node]:
    return lambda e, a, b: e.call(op, a, b)


def _unary(op: torch._ops.OpOverload) -> Callable[..., Node]:
    return lambda e, a: e.call(op, a)


def _maximum(e: Emitter, a: Node, b: Node) -> Node:
    return e.call(aten.maximum.default, a, b)


def _pow(e: Emitter, a: Node, exponent: Any) -> Node:
    return e.call(aten.pow.Tensor_Scalar, a, exponent)


def _scaled_product(e: Emitter, t1: Node, t2: Node, value: Any, op: torch._ops.OpOverload) -> Node:
    """``(value*t1) op t2``, eager CPU's order; ``value*(t1 op t2)``, inductor's lowering's."""
    if value == 1:
        return e.call(op, t1, t2)
    if e.target == "inductor":
        return e.call(aten.mul.Tensor, e.call(op, t1, t2), value)
    return e.call(op, e.call(aten.mul.Tensor, t1, value), t2)


def _addcmul(e: Emitter, s: Node, t1: Node, t2: Node, value: Any = 1) -> Node:
    (s, t1, t2), back = _opmath(e, (s, t1, t2))
    return back(e.call(aten.add.Tensor, s, _scaled_product(e, t1, t2, value, aten.mul.Tensor)))


def _addcdiv(e: Emitter, s: Node, t1: Node, t2: Node, value: Any = 1) -> Node:
    (s, t1, t2), back = _opmath(e, (s, t1, t2))
    return back(e.call(aten.add.Tensor, s, _scaled_product(e, t1, t2, value, aten.div.Tensor)))


def _lerp(e: Emitter, a: Node, b: Node, weight: Any) -> Node:
    (a32, b32), back = _opmath(e, (a, b))
    # The kernel reads the weight, and computes 1 - weight, in its opmath dtype.
    opmath = torch.float64 if dtype_of(a) == torch.float64 else torch.float32
    w = torch.tensor(weight, dtype=opmath)
    diff = e.call(aten.sub.Tensor, b32, a32)
    if abs(w.item()) < 0.5:
        return back(e.call(aten.add.Tensor, a32, e.call(aten.mul.Tensor, diff, w.item())))
    one_minus_w = (torch.tensor(1, dtype=opmath) - w).item()
    return back(e.call(aten.sub.Tensor, b32, e.call(aten.mul.Tensor, diff, one_minus_w)))


_BUILDERS: dict[str, Callable[..., Node]] = {
    "add": _alpha_op(aten.add.Tensor),
    "sub": _alpha_op(aten.sub.Tensor),
    "mul": _binary(aten.mul.Tensor),
    "div": _binary(aten.div.Tensor),
    "maximum": _maximum,
    "pow": _pow,
    "addcmul": _addcmul,
    "addcdiv": _addcdiv,
    "lerp": _lerp,
    **{u: _unary(getattr(aten, u).default) for u in ("sqrt", "rsqrt", "neg", "reciprocal", "abs")},
}


def lower_element(e: Emitter, call: ForeachCall, tensors: dict[str, Node], index: int | None) -> Node:
    """Emits element ``index`` of ``call`` (``None``: the whole flat buffer) and returns it."""
    args = call.element(tensors, index)
    if call.alpha != 1:
        if _is_symbolic(call.alpha):
            raise Unsupported("symbolic alpha")
        return _BUILDERS[call.name](e, *args, alpha=call.alpha)
    return _BUILDERS[call.name](e, *args)


def getitem(e: Emitter, node: Node, index: int) -> Node:
    return e.call(operator.getitem, node, index)

