"""``opt.step()`` inside a user's ``torch.compile``: one custom op, the fused engine inside.

torch's fused optimizers (``Adam(fused=True)``) appear under Dynamo as one op. Ours is
the ``torch.library`` custom op ``npu_optim_compile::fused_step`` (and
``fused_step_amp`` under a GradScaler), whose implementation is the same
:class:`~npu_optim_compile._engine.StepEngine` the eager ``step()`` runs: one compiled
kernel per bucket, whatever the number of tensors. The user's graph holds one node for
the whole step, so it compiles in the same time for 10 tensors or 10,000, and the
hyperparameters are read at run time from the param groups (a scheduler never
recompiles it).

What the op declares: it *mutates* every param the step writes (the user's tensors; a
combined chunk on an accelerator: its flat buffer), and *reads* the grads (written too
under a GradScaler, which unscales them in place). So the compiler orders it correctly
against anything else in the graph that reads params or writes grads
(``clip_grad_norm_`` before the step, ``zero_grad`` after it). The optimizer's state
(``optimizer.state``) is not a graph input: nothing else in a graph reads it, and
leaving it out spares Dynamo one input per state tensor.

Where a bucket's backend is torchair, GE must see the step's ops and torchair cannot
convert this op: the traced step then emits ``_ge_step.py``'s functional op per bucket
instead (:func:`init_group` answers ``"ge"``).

Note [Dynamo and _init_group]: Dynamo's ``OptimizerVariable`` (``torch/_dynamo/variables/
optimizer.py``, torch 2.13) does not trace a method named ``_init_group``: it calls it in
Python with the real optimizer, when the arguments are constants, empty lists or
``param_groups[i]``; appends the tensors the call put into those lists to the traced
lists as graph inputs (grads with their ``p.grad`` sources, params as static tensors);
and returns the call's result as a constant. :func:`init_group` is that method for this
class: it makes every group's plan current (as the eager step would) and fills the
lists.

Guards: the traced step reads ``opt._engine.generation``, which changes whenever a plan
is made anew; the graph is therefore retraced after a new plan (its params list could be
stale). Should the op still meet a stale plan within a call, it runs the engine on the
current one, which is correct either way. Dynamo guards on a float
``lr`` in the param groups: the first trace turns it into a 0-d tensor (torch.optim's
own recipe for compiled optimizers; LR schedulers then ``fill_`` it).
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._hyper import hyper_dtype
from ._amp import Amp, amp_of

if TYPE_CHECKING:
    from .optimizer import NpuFusedRMSprop

__all__ = ["eager_step", "init_group", "traced_step", "traced_zero_grad", "register"]

_handles = itertools.count(1)
_optimizers: weakref.WeakValueDictionary[int, NpuFusedRMSprop] = weakref.WeakValueDictionary()


def register(opt: NpuFusedRMSprop) -> int:
    """A handle for ``opt`` that the compiled graph passes to the op (never reused)."""
    handle = next(_handles)
    _optimizers[handle] = opt
    return handle


#: The dispatch state of plain eager code, captured at import. A custom op runs below
#: autograd (its keys excluded); the compiled bucket steps guard on the dispatch keys
#: they see, so they must see the same state as in the eager step, or they recompile.
_EAGER_DISPATCH = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def _run(buffers: list[Tensor], grads: list[Tensor], positions: list[int], handle: int, generation: int, amp: Amp) -> None:
    opt = _optimizers.get(handle)
    if opt is None:
        raise RuntimeError("npu_optim_compile::fused_step: the optimizer this graph was traced for is gone")
    engine = opt._engine
    expected = engine.step_buffers() if engine.generation == generation else None
    with torch._C._ForceDispatchKeyGuard(*_EAGER_DISPATCH), torch.no_grad():
        engine.step(opt.param_groups, opt.state, amp, grads=_regroup(opt, grads, positions))
    if expected is not None and any(b.data_ptr() != e.data_ptr() for b, e in zip(buffers, expected)):
        # The compiler handed us copies (it did not re-inplace the op): fill them with
        # the new values, which it then writes back.
        torch._foreach_copy_(buffers, expected)


def _regroup(opt: NpuFusedRMSprop, grads: list[Tensor], positions: list[int]) -> list[list[Tensor | None]]:
    """The grads the graph passed, back into per-group lists, None where a param had
    no grad when the graph was traced (``positions``: their indices, counted over all
    groups' params in order)."""
    sizes = [len(group["params"]) for group in opt.param_groups]
    out, start = [], 0
    if len(grads) == sum(sizes):  # every param has a grad (the common case)
        for n in sizes:
            out.append(grads[start : start + n])
            start += n
        return out
    where = dict(zip(positions, grads))
    for n in sizes:
        out.append([where.get(i) for i in range(start, start + n)])
        start += n
    return out


@torch.library.custom_op("npu_optim_compile::fused_step", mutates_args=("buffers",))
def fused_step(buffers: list[Tensor], grads: list[Tensor], positions: list[int], handle: int, generation: int) -> None:
    """One fused step of the optimizer ``handle`` (see the module docstring)."""
    _run(buffers, grads, positions, handle, generation, Amp(None, None))


@fused_step.register_fake
def _(buffers, grads, positions, handle, generation) -> None:
    return None


@torch.library.custom_op("npu_optim_compile::fused_step_amp", mutates_args=("buffers", "grads"))
def fused_step_amp(
    buffers: list[Tensor],
    grads: list[Tensor],
    positions: list[int],
    grad_scale: Tensor | None,
    found_inf: Tensor,
    handle: int,
    generation: int,
) -> None:
    """``fused_step`` under a GradScaler: unscales the grads in place, skips on inf."""
    _run(buffers, grads, positions, handle, generation, Amp(grad_scale, found_inf))


@fused_step_amp.register_fake
def _(buffers, grads, positions, grad_scale, found_inf, handle, generation) -> None:
    return None


def _tensor_lr(group: dict, device: torch.device) -> None:
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        group["lr"] = torch.tensor(float(lr), dtype=hyper_dtype(device), device=device)


def init_group(opt: NpuFusedRMSprop, _group, buffers: list, grads: list, inputs: list | None = None) -> tuple | None:
    """Make every layout current and fill the traced step's lists. Returns
    ``("op", positions)``: the positions of the params that have a grad (counted over all
    groups), for the engine's op (``buffers`` and ``grads`` filled); ``("ge", groups)``
    when a bucket's backend is torchair: per group ``(index, checks, layout)`` for
    ``_ge_step.trace_buckets`` (``inputs`` filled with its tensors); or None when a param
    is a tensor subclass (DTensor), which neither op can take, or torchair's op cannot
    take the options (``_ge_step.unsupported``): the step then runs eagerly, behind a
    graph break.

    Called by Dynamo in Python, not traced (see Note [Dynamo and _init_group]).
    """
    groups = opt.param_groups
    if any(is_traceable_wrapper_subclass(p) for g in groups for p in g["params"]):
        return None
    engine = opt._engine
    positions = []
    params = [p for g in groups for p in g["params"]]
    work = []
    for index, group in enumerate(groups):
        with_grad = [p for p in group["params"] if p.grad is not None]
        if with_grad:
            _tensor_lr(group, with_grad[0].device)
        options = engine.options(index, group)
        item = engine.prepare(index, group, options, opt.state)
        if item is not None:
            work.append((group, item))
    if inputs is not None and any(engine._resolve_backend(b.device) == "torchair" for _, w in work for b in w.plan.buckets):
        layout = _ge_layout(opt, work, inputs)
        return None if layout is None else ("ge", layout)
    for i, p in enumerate(params):
        if p.grad is not None:
            positions.append(i)
            grads.append(p.grad)
    buffers.extend(engine.step_buffers())
    return ("op", tuple(positions))


def _ge_layout(opt: NpuFusedRMSprop, work: list, inputs: list) -> tuple:
    """``init_group``'s ``"ge"`` answer (see ``_ge_step.py``), filling ``inputs``."""
    from ._ge_step import hyper_sources, register_converter, unsupported

    register_converter()  # here, in Python: Dynamo does not trace torchair's code
    amp_on = getattr(opt, "found_inf", None) is not None
    out = []
    for group, item in work:
        why = unsupported(item.plan, item.options, amp_on, opt._engine.combiner is not None)
        if why:
            warnings.warn(
                f"npu_optim_compile: the step of param group {item.index} cannot become part of a graph that "
                f"torchair compiles with {why}; opt.step() runs eagerly there (a graph break), each bucket "
                "step still compiled by torchair",
                stacklevel=2,
            )
            inputs.clear()
            return None
        flags = ",".join(sorted(item.options.structure()))
        sources = hyper_sources(item.options, group)
        layout = []
        for bucket in item.plan.buckets:
            states = bucket.states
            inputs += bucket.params
            inputs += bucket.take(item.grads)
            for role in ("square_avg", "grad_avg", "momentum_buffer"):
                if role in item.options.roles:
                    inputs += [st[role] for st in states]
            inputs += [st["step"] for st in states]
            layout.append((len(bucket.params), flags, sources))
        # Every number and switch the step read: the traced step compares them, so that
        # Dynamo guards on them (a change retraces, and the new value is a constant of the
        # new graph); a tensor (lr) is a graph input instead.
        keys = opt._engine._keys
        checks = tuple(
            (k, v) for k, v in group.items() if k in keys and k != "capturable" and not isinstance(v, Tensor)
        )  # (Dynamo's optimizer tracing sets "capturable" in its view of the groups)
        out.append((item.index, checks, tuple(layout)))
    return tuple(out)


@torch._dynamo.disable
def eager_step(opt: NpuFusedRMSprop) -> None:
    """The engine's step, never traced: also where Dynamo skips the frame of ``step()``
    (after a graph break) but would trace the functions it calls."""
    opt._engine.step(opt.param_groups, opt.state, amp_of(opt))


def traced_step(opt: NpuFusedRMSprop) -> None:
    """``opt.step()``'s body under Dynamo: one custom-op call (``_ge_step.py``'s
    functional op per bucket where torchair compiles the step)."""
    buffers: list[Tensor] = []
    grads: list[Tensor] = []
    inputs: list[Tensor] = []
    answer = opt._init_group(None, buffers, grads, inputs)
    if answer is None:
        eager_step(opt)
        return
    generation = opt._engine.generation  # read while tracing: a guard on it
    if answer[0] == "ge":
        _traced_ge(opt, answer[1], inputs)
        return
    positions = list(answer[1])
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is None:
        torch.ops.npu_optim_compile.fused_step(buffers, grads, positions, opt._handle, generation)
    else:
        grad_scale = getattr(opt, "grad_scale", None)
        torch.ops.npu_optim_compile.fused_step_amp(
            buffers, grads, positions, grad_scale, found_inf, opt._handle, generation
        )


def _traced_ge(opt: NpuFusedRMSprop, groups: tuple, inputs: list[Tensor]) -> None:
    from ._ge_step import trace_buckets

    at = 0
    with torch.no_grad():
        for index, checks, layout in groups:
            group = opt.param_groups[index]
            for key, value in checks:
                if group[key] != value:
                    _stale(key)
            at += trace_buckets(group, layout, inputs[at:])


@torch._dynamo.disable
def _stale(key: str) -> None:
    raise RuntimeError(f"npu_optim_compile: param group entry {key!r} changed while its step was traced")


def traced_zero_grad(opt: NpuFusedRMSprop, set_to_none: bool) -> None:
    """``torch.optim.Optimizer.zero_grad``'s effect, traceable (Dynamo skips the original)."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if set_to_none:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
    elif grads and opt._engine._resolve_backend(grads[0].device) == "torchair":
        for g in grads:  # torchair has converters for aten.zero, none for _foreach_zero
            g.zero_()
    elif grads:
        torch._foreach_zero_(grads)
