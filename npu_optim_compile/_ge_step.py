"""``opt.step()`` inside a user's ``torch.compile`` when torchair compiles it (Ascend).

Under inductor the step is one opaque custom op that runs the eager engine
(``_in_compile.py``). torchair cannot take that op: it converts every node of the
user's graph into Graph Engine (GE) ops, has no converter for a Python op, and its
``auto_functionalized_v2`` converter (``torchair/_ge_concrete_graph/auto_functionalized_v2.py``,
torch_npu 2.13.0) cannot convert any custom op that mutates a ``Tensor[]`` argument.

So for buckets whose backend is torchair the traced step emits, per bucket, the
*functional* op ``npu_optim_compile::bucket_step``: it takes the bucket's params, grads,
state tensors and step counts, and the bucket's hyperparameters as one 1-D tensor
(``_hyper.HYPER_LAYOUT``, built in the user's graph from the param group: a tensor
``lr`` is a graph input, so an LR scheduler never recompiles), and returns the new
values, which the traced step copies into the user's tensors (``aten.copy_``: torchair
makes those outputs that reuse the inputs' memory). The structure (the on/off options,
``RMSpropOptions.structure()``) is a string argument, so the converter needs nothing of
the optimizer.

Its GE converter (:func:`register_converter`, registered with torchair when a step is
traced for it) traces the bucket step on flat buffers (``torch.cat`` per role, the same
``rmsprop_step`` the compiled bucket step runs, ``torch.split`` back) with ``make_fx``,
runs our foreach-fusion pass on it, and emits that aten graph through torchair's own
converters: ConcatV2, the elementwise step, SplitV. The user's graph holds one node per
bucket, so Dynamo traces it in the same time for 10 tensors or 10,000. Eagerly (and
under any other backend) the op runs the same function in Python.

Not taken here (``_in_compile.py`` warns and runs the eager step behind a graph break):
``combine_params=True`` buckets, ``caution`` (its per-param means), a GradScaler,
complex params, and params the engine steps per tensor (``_plan.py``'s loose params).
"""

from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from ._bucket_step import StepKey, _make_python_step
from ._hyper import HYPER_LAYOUT, hyper_dtype

__all__ = ["OP", "bucket_values", "register_converter", "trace_buckets", "unsupported"]

OP = "npu_optim_compile::bucket_step"

#: Structure flags this op cannot take (see the module docstring).
_UNSUPPORTED = frozenset({"caution", "found_inf"})


def _flags(flags: str) -> frozenset[str]:
    return frozenset(f for f in flags.split(",") if f)


def bucket_values(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    grad_avgs: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    steps: Sequence[Tensor],
    hyper: Tensor,
    flags: str,
) -> list[Tensor]:
    """One bucket step, functionally: the new params, square averages, grad averages
    (centered), momentum buffers (momentum) and step counts, in that order.

    The math is the compiled bucket step's (``_bucket_step._make_python_step``) on flat
    copies: ``p, g, v = cat(params), cat(grads), cat(square_avgs)``, then
    ``rmsprop_step([p], [g], [v], ...)``, then each result split back to its tensor's
    shape. With bias correction the bucket's params share one step count (``_plan.py``),
    so ``hyper``'s step slot is ``steps[0] + 1``."""
    flagset = _flags(flags)
    bad = flagset & _UNSUPPORTED
    if bad:
        raise NotImplementedError(f"{OP} does not take {sorted(bad)}")
    centered, momentum = "centered" in flagset, "momentum" in flagset
    step = _make_python_step(StepKey("eager", params[0].device.type, params[0].dtype, flagset))
    sizes = [t.numel() for t in params]

    def flat(tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1) for t in tensors])

    p, g, v = flat(params), flat(grads), flat(square_avgs)
    a = flat(grad_avgs) if centered else None
    b = flat(momentum_buffers) if momentum else None
    if "bias_correction" in flagset:
        hyper = torch.cat([hyper[:-1], (steps[0] + 1).reshape(1).to(hyper.dtype)])
    step(p, g, v, a, b, hyper, None, None, None)

    def split(flat_new: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
        # Copies, not views of the flat buffer the step wrote in place: functionalize
        # would regenerate every view from it at each use (a graph quadratic in n).
        pieces = torch.split_with_sizes_copy(flat_new, sizes)
        return [piece.view(t.shape) for piece, t in zip(pieces, like)]

    out = split(p, params) + split(v, square_avgs)
    out += split(a, grad_avgs) if centered else []
    out += split(b, momentum_buffers) if momentum else []
    return out + [s + 1 for s in steps]


@torch.library.custom_op(OP, mutates_args=())
def bucket_step(
    params: list[Tensor],
    grads: list[Tensor],
    square_avgs: list[Tensor],
    grad_avgs: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    hyper: Tensor,
    flags: str,
) -> list[Tensor]:
    """:func:`bucket_values` as a custom op (its outputs are fresh tensors)."""
    values = bucket_values(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper, flags)
    return [t.clone() for t in values]


@bucket_step.register_fake
def _(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper, flags) -> list[Tensor]:
    flagset = _flags(flags)
    like = [*params, *square_avgs]
    like += grad_avgs if "centered" in flagset else []
    like += momentum_buffers if "momentum" in flagset else []
    return [torch.empty_like(t) for t in like] + [torch.empty_like(s) for s in steps]


# -- the GE converter ---------------------------------------------------------------


def _emit(gm: torch.fx.GraphModule, inputs: list):
    """Emit an aten FX graph into the GE graph torchair is building, node by node,
    through torchair's own converters."""
    from torchair._ge_concrete_graph.fx2ge_converter import get_or_auto_gen_converter, set_ge_outputs

    env: dict = {}
    feed = iter(inputs)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            env[node] = next(feed)
        elif node.op == "output":
            return list(torch.fx.node.map_arg(node.args[0], env.__getitem__))
        else:
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            if node.target is operator.getitem:
                env[node] = args[0][args[1]]
                continue
            converter = get_or_auto_gen_converter(node.target)
            if converter.require_meta:
                kwargs = dict(kwargs, meta_outputs=node.meta["val"])
            env[node] = converter(*args, **kwargs)
            set_ge_outputs(env[node], node.meta["val"])
    raise RuntimeError(f"{OP}: the traced bucket step has no output")


def _converter(params, grads, square_avgs, grad_avgs, momentum_buffers, steps, hyper, flags, meta_outputs=None):
    """The GE ops of one ``bucket_step`` call (``meta_outputs``: torchair passes the
    fake outputs; the traced graph has its own)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .passes import torchair_foreach_fusion

    lists = [list(params), list(grads), list(square_avgs), list(grad_avgs), list(momentum_buffers), list(steps)]
    inputs = [t for ts in lists for t in ts] + [hyper]

    def functional(*flat):
        it = iter(flat)
        parts = [[next(it) for _ in ts] for ts in lists]
        return bucket_values(*parts, next(it), flags)

    examples = [torch.zeros(t.meta.shape, dtype=t.meta.dtype) for t in inputs]
    gm = make_fx(torch.func.functionalize(functional, remove="mutations"), tracing_mode="fake")(*examples)
    for node in gm.graph.nodes:  # GE has no views: SplitV's outputs are new tensors either way
        if node.target is torch.ops.aten.split_with_sizes_copy.default:
            node.target = torch.ops.aten.split_with_sizes.default
    torchair_foreach_fusion(gm, examples, None)
    return _emit(gm, inputs)


_registered: weakref.WeakSet = weakref.WeakSet()


def register_converter() -> None:
    """Give the imported torchair the op's converter (once per torchair module: an
    ``ascend_dry_run()`` imports torchair anew each time)."""
    torchair = sys.modules.get("torchair")
    if torchair is None:
        import torchair  # a step traced for torchair: the user's backend imported it
    if torchair in _registered:
        return
    torchair.register_fx_node_ge_converter(torch.ops.npu_optim_compile.bucket_step.default)(_converter)
    _registered.add(torchair)


# -- what the traced step emits ------------------------------------------------------


def unsupported(plan, options, amp_on: bool, combined: bool) -> str:
    """Why a group's plan cannot take this op ("" when it can)."""
    if amp_on:
        return "a GradScaler"
    if options.caution:
        return "caution=True"
    if plan.loose:
        return "params the step updates per tensor (loose params, see _plan.py)"
    if combined or any(b.kind != "staged" for b in plan.buckets):
        return "combine_params=True"
    if any(b.dtype.is_complex for b in plan.buckets):
        return "complex params"
    return ""


def hyper_sources(options, group) -> tuple:
    """Where each :data:`HYPER_LAYOUT` value (but the step) comes from, as the traced
    step reads it: ``("key", k)`` for a tensor of the group (a graph input: an LR
    scheduler's ``fill_`` never recompiles), ``("const", x)`` for a number (a constant of
    the graph; ``_in_compile.py`` has Dynamo guard on the group's numbers)."""
    out = []
    for name in HYPER_LAYOUT[:-1]:
        value = getattr(options, name)
        key = next((k for k, v in group.items() if v is value), None) if isinstance(value, Tensor) else None
        out.append(("key", key) if key is not None else ("const", 0.0 if value is None else float(value)))
    return tuple(out)


def trace_buckets(group: dict, layout: tuple, tensors: Sequence[Tensor]) -> int:
    """Emit the op for each bucket of one group (``layout``: per bucket ``(n, flags,
    hyper sources)``; ``tensors``: per bucket its params, grads, state per role and step
    counts, ``n`` each). Returns how many tensors it used."""
    at = 0
    for n, flags, sources in layout:
        flagset = _flags(flags)
        counts = [n, n, n, n if "centered" in flagset else 0, n if "momentum" in flagset else 0, n]
        lists = []
        for count in counts:
            lists.append(list(tensors[at : at + count]))
            at += count
        params = lists[0]
        dtype = hyper_dtype(params[0].device)
        values = []
        for kind, where in sources:
            value = group[where] if kind == "key" else where
            if isinstance(value, Tensor):
                values.append(value.reshape(1).to(device=params[0].device, dtype=dtype))
            else:
                values.append(torch.tensor([float(value)], dtype=dtype, device=params[0].device))
        hyper = torch.cat(values + [torch.zeros(1, dtype=dtype, device=params[0].device)])
        new = torch.ops.npu_optim_compile.bucket_step(*lists, hyper, flags)
        targets = lists[0] + lists[2] + lists[3] + lists[4] + lists[5]
        for old, value in zip(targets, new):
            old.copy_(value)
    return at
