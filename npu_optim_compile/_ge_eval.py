"""An interpreter of the GE (CANN Graph Engine) ops torchair emits for our graphs.

:func:`evaluate` runs a ``ge.proto.GraphDef`` (what torchair hands GE) op by op on CPU
tensors: ops come in topological order; an input is ``"node:index"``, ``""`` for an
absent optional input, ``"node:-1"`` for a control edge (ignored: ops run in order).
An op it does not know raises :class:`UnknownGeOpError`, naming it.

Each op is written from its CANN operator prototype, ``REG_OP(<op>)`` with its doc
comment, in CANN's ``ops/*.h`` headers (cited per op as ``<header>.h``; read from the
copy in mindspore-ai/graphengine, ``910/third_party/fwkacllib/inc/ops/``, commit
cd75e149). torchair's own op builders in the torch_npu 2.13.0 wheel
(``torchair/_ge_concrete_graph/auto_generated_ge_raw_ops.py``, and ``torchair/ge/_ge_graph.py``
for ``Data``/``Const``/``Cast``) carry the same REG_OP input and attribute lists.

Numerics. An op computes in the dtype of its operands, one rounding per step, as
torch's CPU kernels do for that dtype (bf16 and fp16 are computed in float32 and
rounded, as CANN's vector kernels do for them). An op whose prototype types its
inputs with one ``DATATYPE(T, Promote({...}))`` (``Mul``, ``Sxpy``, ``Pow``) computes
in the promoted dtype of its inputs, by dtype alone (not torch's rule, where a 0-d
tensor yields to a higher-rank one). Any other op takes inputs of one dtype, as its
doc requires ("of the same dtype as x1"): the interpreter raises otherwise, so a graph
that mixes dtypes where GE would reject them fails here too. What an NPU may do
differently: fuse ``x1 - x2 * alpha`` into one rounding, sum ``InplaceIndexAdd``'s
duplicate indices in another order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["GeEvalError", "UnknownGeOpError", "KNOWN_OPS", "dtype_name", "dtypes_in", "evaluate", "runtime_dtype_name"]


class GeEvalError(RuntimeError):
    """A GE graph the interpreter cannot evaluate as CANN defines its ops."""


class UnknownGeOpError(GeEvalError):
    """A GE op the interpreter has no definition of."""


#: GE dtype names (``ge_ir.proto``'s ``DataType``) and the torch dtypes they hold.
_TORCH_DTYPES = {
    "DT_FLOAT": torch.float32,
    "DT_FLOAT16": torch.float16,
    "DT_BF16": torch.bfloat16,
    "DT_DOUBLE": torch.float64,
    "DT_INT8": torch.int8,
    "DT_UINT8": torch.uint8,
    "DT_INT16": torch.int16,
    "DT_INT32": torch.int32,
    "DT_INT64": torch.int64,
    "DT_BOOL": torch.bool,
    "DT_COMPLEX64": torch.complex64,
    "DT_COMPLEX128": torch.complex128,
}
_GE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
#: The other numbering: attributes such as Cast's ``dst_type`` hold GE's runtime
#: ``ge::DataType`` (``torchair/ge/_ge_graph.py::DataType``), not ``ge_ir.proto``'s
#: ``DataType`` of tensor descriptions (where 0 is DT_UNDEFINED and DT_FLOAT is 1).
_RUNTIME_DTYPES = {
    0: "DT_FLOAT", 1: "DT_FLOAT16", 2: "DT_INT8", 3: "DT_INT32", 4: "DT_UINT8", 6: "DT_INT16",
    7: "DT_UINT16", 8: "DT_UINT32", 9: "DT_INT64", 10: "DT_UINT64", 11: "DT_DOUBLE", 12: "DT_BOOL",
    16: "DT_COMPLEX64", 17: "DT_COMPLEX128", 27: "DT_BF16",
}  # fmt: skip

_Op = Any  # a ge.proto.OpDef
_Impl = Callable[[_Op, list, Sequence[Tensor]], list]
_OPS: dict[str, _Impl] = {}


def dtype_name(message: Any, code: int) -> str:
    """The name of a tensor description's dtype ``code`` (``ge_ir.proto``'s
    ``DataType``, read from the proto ``message`` comes from)."""
    enum = message.DESCRIPTOR.file.enum_types_by_name["DataType"]
    return enum.values_by_number[code].name if code in enum.values_by_number else f"DataType({code})"


def runtime_dtype_name(code: int) -> str:
    """The name of a dtype attribute's ``code`` (GE's ``ge::DataType``)."""
    return _RUNTIME_DTYPES.get(code, f"ge::DataType({code})")


def dtypes_in(graph_def: Any) -> set[str]:
    """Every dtype a graph names: its ops' input and output descriptions (unset ones
    read DT_UNDEFINED), Const values, and the targets of Cast (``dst_type``) and Shape
    (``dtype``)."""
    names = set()
    for op in graph_def.op:
        for desc in (*op.input_desc, *op.output_desc):
            names.add(dtype_name(graph_def, desc.dtype))
        if op.type == "Const":
            names.add(dtype_name(graph_def, op.attr["value"].t.desc.dtype))
        for attr in ("dst_type", "dtype"):
            if attr in op.attr and op.type in ("Cast", "Shape"):
                names.add(runtime_dtype_name(op.attr[attr].i))
    return names


def _torch_dtype(name: str) -> torch.dtype:
    if name not in _TORCH_DTYPES:
        raise GeEvalError(f"GE dtype {name} has no torch dtype here")
    return _TORCH_DTYPES[name]


def _attr(op: _Op, name: str, default: Any = None) -> Any:
    if name not in op.attr:
        return default
    value = op.attr[name]
    return getattr(value, value.WhichOneof("value"))


def _op(name: str) -> Callable[[_Impl], _Impl]:
    def register(fn: _Impl) -> _Impl:
        _OPS[name] = fn
        return fn

    return register


def _one_dtype(op: _Op, tensors: Sequence[Tensor]) -> None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        names = ", ".join(_GE_NAMES.get(d, str(d)) for d in sorted(dtypes, key=str))
        raise GeEvalError(f"{op.type} {op.name!r} takes inputs of one dtype (CANN's REG_OP({op.type})); got {names}")


def _promoted(tensors: Sequence[Tensor]) -> list[Tensor]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _check_attr(op: _Op, name: str, supported: Any) -> None:
    value = _attr(op, name, supported)
    if value != supported:
        raise GeEvalError(f"{op.type} {op.name!r}: attribute {name}={value!r} is not written here (only {supported!r})")


# --- graph boundary: array_ops.h ----------------------------------------------------


@_op("Data")
def _data(op, ins, graph_inputs):
    """``REG_OP(Data)`` (array_ops.h): input ``index`` of the graph."""
    index = _attr(op, "index", 0)
    x = graph_inputs[index]
    declared = op.output_desc[0].dtype if op.output_desc else None
    if declared is not None and _GE_NAMES.get(x.dtype) != dtype_name(op, declared):
        raise GeEvalError(f"Data {op.name!r} declares {dtype_name(op, declared)}, got a {x.dtype} input")
    return [x]


@_op("Const")
def _const(op, ins, graph_inputs):
    """``REG_OP(Const)`` (array_ops.h): the tensor in attribute ``value`` (a TensorDef:
    ``desc`` with dtype and shape, ``data`` the raw little-endian elements, as
    ``torchair/ge/_ge_graph.py::Const`` writes them)."""
    t = op.attr["value"].t
    dtype = _torch_dtype(dtype_name(op, t.desc.dtype))
    shape = list(t.desc.shape.dim)
    if not t.data:
        return [torch.zeros(shape, dtype=dtype)]
    return [torch.frombuffer(bytearray(t.data), dtype=dtype).reshape(shape).clone()]


# --- elementwise: elewise_calculation_ops.h -----------------------------------------


@_op("Cast")
def _cast(op, ins, graph_inputs):
    """``REG_OP(Cast)``: ``x`` converted to ``dst_type`` (float to bf16/fp16 rounds to
    nearest even, as torch's ``Tensor.to``)."""
    return [ins[0].to(_torch_dtype(runtime_dtype_name(_attr(op, "dst_type"))))]


@_op("Mul")
def _mul(op, ins, graph_inputs):
    """``REG_OP(Mul)``: ``y = x1 * x2``, in ``Promote(T1, T2)``."""
    x1, x2 = _promoted(ins[:2])
    return [x1 * x2]


@_op("Muls")
def _muls(op, ins, graph_inputs):
    """``REG_OP(Muls)``: ``y = x * value`` (a float attribute), dtype of ``x``."""
    (x,) = ins
    if not x.is_floating_point():
        raise GeEvalError(f"Muls {op.name!r} on {x.dtype} is not written here")
    return [x * float(_attr(op, "value"))]


@_op("Add")
def _add(op, ins, graph_inputs):
    """``REG_OP(Add)``: ``y = x1 + x2`` (one dtype, broadcast)."""
    _one_dtype(op, ins)
    return [ins[0] + ins[1]]


@_op("Sub")
def _sub(op, ins, graph_inputs):
    """``REG_OP(Sub)``: ``y = x1 - x2``; "x2: a Tensor of the same dtype as x1"."""
    _one_dtype(op, ins)
    return [ins[0] - ins[1]]


@_op("RealDiv")
def _real_div(op, ins, graph_inputs):
    """``REG_OP(RealDiv)``: ``y = x1 / x2`` for real types (floating here)."""
    _one_dtype(op, ins)
    if not ins[0].is_floating_point():
        raise GeEvalError(f"RealDiv {op.name!r} on {ins[0].dtype} is not written here")
    return [ins[0] / ins[1]]


@_op("Sxpy")
def _sxpy(op, ins, graph_inputs):
    """``REG_OP(Sxpy)``: "Computes the result of x1 - x2 * alpha", in
    ``Promote(T1, T2, T3)``; ``alpha`` is optional (absent: ``x1 - x2``)."""
    x1, x2, alpha = (list(ins) + [None])[:3]
    if alpha is None:
        x1, x2 = _promoted([x1, x2])
        return [x1 - x2]
    x1, x2, alpha = _promoted([x1, x2, alpha])
    return [x1 - x2 * alpha]


@_op("Sqrt")
def _sqrt(op, ins, graph_inputs):
    """``REG_OP(Sqrt)``: square root, element-wise."""
    return [torch.sqrt(ins[0])]


@_op("Neg")
def _neg(op, ins, graph_inputs):
    """``REG_OP(Neg)``: ``y = -x``."""
    return [torch.neg(ins[0])]


@_op("Pow")
def _pow(op, ins, graph_inputs):
    """``REG_OP(Pow)``: ``x1`` to the power ``x2``, in ``Promote(T1, T2)``."""
    x1, x2 = _promoted(ins[:2])
    return [torch.pow(x1, x2)]


@_op("Greater")
def _greater(op, ins, graph_inputs):
    """``REG_OP(Greater)``: bool ``x1 > x2`` (one dtype, broadcast)."""
    _one_dtype(op, ins)
    return [ins[0] > ins[1]]


@_op("ZerosLike")
def _zeros_like(op, ins, graph_inputs):
    """``REG_OP(ZerosLike)``: zeros of ``x``'s dtype and shape."""
    return [torch.zeros_like(ins[0])]


@_op("TensorMove")
def _tensor_move(op, ins, graph_inputs):
    """``REG_OP(TensorMove)``: "Copy data from x to y" (a new tensor)."""
    return [ins[0].clone()]


@_op("ClipByValueV2")
def _clip_by_value(op, ins, graph_inputs):
    """``REG_OP(ClipByValueV2)``: ``min(max(x, clip_value_min), clip_value_max)``;
    the bounds "of the same dtype as x"."""
    _one_dtype(op, ins)
    x, lo, hi = ins
    return [torch.minimum(torch.maximum(x, lo), hi)]


@_op("Assign")
def _assign(op, ins, graph_inputs):
    """``REG_OP(Assign)``: "Updates ref by assigning value to it" (ref is written)."""
    ref, value = ins
    return [ref.copy_(value)]


# --- selection_ops.h ----------------------------------------------------------------


@_op("SelectV2")
def _select_v2(op, ins, graph_inputs):
    """``REG_OP(SelectV2)``: ``then`` where ``condition`` (bool), else ``else``
    ("else: a Tensor of the same type as then"), broadcast."""
    condition, then, other = ins
    if condition.dtype != torch.bool:
        raise GeEvalError(f"SelectV2 {op.name!r}: condition must be DT_BOOL, got {condition.dtype}")
    _one_dtype(op, [then, other])
    return [torch.where(condition, then, other)]


def _check_indices(op: _Op, indices: Tensor, size: int) -> None:
    if indices.dtype not in (torch.int32, torch.int64):
        raise GeEvalError(f"{op.type} {op.name!r}: indices must be int32 or int64, got {indices.dtype}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise GeEvalError(f"{op.type} {op.name!r}: indices must be in [0, {size}) (CANN's constraint)")


@_op("Gather")
def _gather(op, ins, graph_inputs):
    """``REG_OP(Gather)``: slices of ``x`` along dim 0 at ``indices``, shape
    ``indices.shape + x.shape[1:]``; "indices is in the range [0, x.shape[0])"."""
    for name, supported in (("batch_dims", 0), ("negative_index_support", False), ("is_preprocessed", False)):
        _check_attr(op, name, supported)
    x, indices = ins
    _check_indices(op, indices, x.shape[0])
    return [x[indices.long()]]


@_op("GatherV2")
def _gather_v2(op, ins, graph_inputs):
    """``REG_OP(GatherV2)``: slices of ``x`` at ``indices`` along ``axis`` (an input),
    shape ``x.shape[:axis] + indices.shape + x.shape[axis+1:]``."""
    for name, supported in (("batch_dims", 0), ("negative_index_support", False), ("is_preprocessed", False)):
        _check_attr(op, name, supported)
    x, indices, axis = ins
    axis = int(axis) % max(x.dim(), 1)
    _check_indices(op, indices, x.shape[axis])
    flat = x.index_select(axis, indices.reshape(-1).long())
    return [flat.reshape(*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])]


@_op("InplaceIndexAdd")
def _inplace_index_add(op, ins, graph_inputs):
    """``REG_OP(InplaceIndexAdd)``: "Add updates to var according to axis and indices"
    (``var[indices[i]] += alpha * updates[i]`` along ``axis``); ``var`` is written and
    is the output; ``updates`` and ``alpha`` "of the same type as var"."""
    var, indices, updates, alpha = (list(ins) + [None])[:4]
    _one_dtype(op, [var, updates] + ([alpha] if alpha is not None else []))
    axis = _attr(op, "axis")
    _check_indices(op, indices, var.shape[axis])
    scale = 1 if alpha is None else alpha.reshape(()).item()
    return [var.index_add_(axis, indices.long(), updates, alpha=scale)]


# --- reduce_ops.h ------------------------------------------------------------------


@_op("ReduceSum")
def _reduce_sum(op, ins, graph_inputs):
    """``REG_OP(ReduceSum)`` (reduce_ops.h): the sum of ``x`` over the dimensions
    ``axes`` (none: ``x`` itself, TensorFlow's Sum), kept as length 1 with
    ``keep_dims``; "the same type as input x"."""
    x, axes = ins
    dims = [int(a) for a in axes.reshape(-1)]
    if not dims:
        return [x.clone()]
    return [torch.sum(x, dim=dims, keepdim=bool(_attr(op, "keep_dims", False)))]


# --- array_ops.h, pad_ops.h, split_combination_ops.h, transformation_ops.h ------------


@_op("Identity")
def _identity(op, ins, graph_inputs):
    """``REG_OP(Identity)`` (array_ops.h): "a tensor with the same shape and contents as
    input" (a new tensor)."""
    return [ins[0].clone()]


@_op("Shape")
def _shape(op, ins, graph_inputs):
    """``REG_OP(Shape)`` (array_ops.h): the shape of ``x`` as a 1-D tensor of attribute
    ``dtype`` (DT_INT32 by default)."""
    code = _attr(op, "dtype", None)
    dtype = torch.int32 if code is None else _torch_dtype(runtime_dtype_name(code))
    return [torch.tensor(list(ins[0].shape), dtype=dtype)]


@_op("Reshape")
def _reshape(op, ins, graph_inputs):
    """``REG_OP(Reshape)`` (array_ops.h): ``x`` with shape ``shape`` (int32/int64; -1
    inferred); attributes ``axis`` 0 and ``num_axes`` -1 reshape all of it."""
    _check_attr(op, "axis", 0)
    _check_attr(op, "num_axes", -1)
    x, shape = ins
    return [x.reshape([int(d) for d in shape.reshape(-1)])]


@_op("Fill")
def _fill(op, ins, graph_inputs):
    """``REG_OP(Fill)`` (array_ops.h): "Creates a tensor filled with a scalar value":
    shape ``dims`` (int32/int64), every element ``value`` (a 0-d tensor, its dtype)."""
    dims, value = ins
    if value.numel() != 1:
        raise GeEvalError(f"Fill {op.name!r}: value must be a scalar, got shape {list(value.shape)}")
    return [torch.full([int(d) for d in dims.reshape(-1)], value.item(), dtype=value.dtype)]


@_op("BroadcastTo")
def _broadcast_to(op, ins, graph_inputs):
    """``REG_OP(BroadcastTo)`` (pad_ops.h): ``x`` broadcast to ``shape``, trailing
    dimensions first."""
    x, shape = ins
    return [x.expand([int(d) for d in shape.reshape(-1)]).contiguous()]


@_op("Pack")
def _pack(op, ins, graph_inputs):
    """``REG_OP(Pack)`` (split_combination_ops.h): the ``N`` inputs stacked along a new
    dimension ``axis``."""
    n = _attr(op, "N", 1)
    if n != len(ins):
        raise GeEvalError(f"Pack {op.name!r}: N={n} but {len(ins)} inputs")
    _one_dtype(op, ins)
    return [torch.stack(list(ins), dim=_attr(op, "axis", 0))]


@_op("ConcatV2")
def _concat_v2(op, ins, graph_inputs):
    """``REG_OP(ConcatV2)`` (split_combination_ops.h): the ``N`` inputs ``x`` (one dtype)
    joined along ``concat_dim``, the last input."""
    *xs, dim = ins
    n = _attr(op, "N", 1)
    if n != len(xs):
        raise GeEvalError(f"ConcatV2 {op.name!r}: N={n} but {len(xs)} inputs")
    _one_dtype(op, xs)
    return [torch.cat(xs, dim=int(dim))]


@_op("SplitV")
def _split_v(op, ins, graph_inputs):
    """``REG_OP(SplitV)`` (split_combination_ops.h): ``x`` split along ``split_dim`` into
    ``num_split`` pieces of ``size_splits`` ("each ... greater than or equal to 1", summing
    to the dimension)."""
    x, sizes, dim = ins
    sizes = [int(n) for n in sizes.reshape(-1)]
    dim = int(dim)
    if len(sizes) != _attr(op, "num_split") or min(sizes) < 1 or sum(sizes) != x.shape[dim]:
        raise GeEvalError(f"SplitV {op.name!r}: size_splits {sizes} do not split {x.shape[dim]} elements")
    return [t.clone() for t in torch.split(x, sizes, dim=dim)]


@_op("Unpack")
def _unpack(op, ins, graph_inputs):
    """``REG_OP(Unpack)`` (transformation_ops.h): ``x`` split along ``axis`` into
    ``num`` tensors of rank R-1."""
    (x,) = ins
    axis, num = _attr(op, "axis", 0), _attr(op, "num")
    if x.shape[axis] != num:
        raise GeEvalError(f"Unpack {op.name!r}: num={num} but x has {x.shape[axis]} along axis {axis}")
    return list(torch.unbind(x, dim=axis))


#: The GE ops :func:`evaluate` knows.
KNOWN_OPS = frozenset(_OPS) | {"NetOutput"}


def _parse_input(name: str) -> tuple[str, int] | None:
    """``("node", index)`` for ``"node:index"``; None for a control edge or an absent input."""
    if not name:
        return None
    node, _, index = name.rpartition(":")
    if not node:
        return name, 0
    return None if index == "-1" else (node, int(index))


def evaluate(graph_def: Any, inputs: Sequence[Tensor]) -> list[Tensor]:
    """Run ``graph_def`` on ``inputs`` (by ``Data`` index); return ``NetOutput``'s inputs.

    Raises:
        UnknownGeOpError: an op without a definition here (named).
        GeEvalError: an op used outside what CANN defines (mixed dtypes, bad indices).
    """
    values: dict[str, list[Tensor]] = {}
    for op in graph_def.op:
        args = []
        for ref in op.input:
            parsed = _parse_input(ref)
            if parsed is None:
                if not ref:  # an absent optional input keeps its place
                    args.append(None)
                continue
            node, index = parsed
            args.append(values[node][index])
        while args and args[-1] is None:
            args.pop()
        if op.type == "NetOutput":
            return args
        impl = _OPS.get(op.type)
        if impl is None:
            raise UnknownGeOpError(
                f"the dry run's GE interpreter has no definition of GE op {op.type!r} (node {op.name!r}); "
                f"write one in npu_optim_compile/_ge_eval.py from CANN's REG_OP({op.type}), or run on an NPU"
            )
        values[op.name] = impl(op, args, inputs)
    raise GeEvalError(f"GE graph {graph_def.name!r} has no NetOutput")
