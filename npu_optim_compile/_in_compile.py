"""``opt.step()`` inside a user's ``torch.compile``: one custom op, the fused engine inside.

torch's fused optimizers (``Adam(fused=True)``) appear under Dynamo as one op. Ours is
the ``torch.library`` custom op ``npu_optim_compile::fused_step`` (and
``fused_step_amp`` under a GradScaler), whose implementation is the same
:class:`~npu_optim_compile._engine.StepEngine` the eager ``step()`` runs: one compiled
kernel per bucket, whatever the number of tensors. The user's graph holds one node for
the whole step, so it compiles in the same time for 10 tensors or 10,000, and the
hyperparameters are read at run time from the param groups (a scheduler never
recompiles it).

What the op declares: it *mutates* every buffer the step writes (per bucket: the flat
param buffer, the flat state buffers and the step counts; per loose param: the param,
its state and its step), and *reads* the grads (written too under a GradScaler, which
unscales them in place). So the compiler orders it correctly against anything else in
the graph that reads params or writes grads (``clip_grad_norm_`` before the step,
``zero_grad`` after it).

Note [Dynamo and _init_group]: Dynamo's ``OptimizerVariable`` (``torch/_dynamo/variables/
optimizer.py``, torch 2.13) does not trace a method named ``_init_group``: it calls it in
Python with the real optimizer, when the arguments are constants, empty lists or
``param_groups[i]``; appends the tensors the call put into those lists to the traced
lists as graph inputs (grads with their ``p.grad`` sources, our flat buffers as static
global tensors); and returns the call's result as a constant. :func:`init_group` is that
method for this class: it makes every layout current (gathering the buckets, as the
eager step would) and fills the lists.

Guards: the traced step reads ``opt._engine.generation``, which changes whenever a
layout is gathered anew; the graph is therefore retraced after a re-gather (its buffers
would be stale). Should the op still meet a stale layout within a call, it runs the
engine on the current one, which is correct either way. Dynamo guards on a float
``lr`` in the param groups: the first trace turns it into a 0-d tensor (torch.optim's
own recipe for compiled optimizers; LR schedulers then ``fill_`` it).
"""

from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from ._bucket_step import hyper_dtype
from ._engine import Amp

if TYPE_CHECKING:
    from .optimizer import NpuFusedRMSprop

__all__ = ["init_group", "traced_step", "traced_zero_grad", "register"]

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
    expected = engine.step_buffers(opt.state) if engine.generation == generation else None
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


def init_group(opt: NpuFusedRMSprop, _group, buffers: list, grads: list) -> tuple[int, ...] | None:
    """Make every layout current and fill the op's lists; return the positions of the
    params that have a grad (counted over all groups), or None when a param is a tensor
    subclass (DTensor), which the op cannot take (the step then runs eagerly, behind a
    graph break).

    Called by Dynamo in Python, not traced (see Note [Dynamo and _init_group]).
    """
    groups = opt.param_groups
    if any(is_traceable_wrapper_subclass(p) for g in groups for p in g["params"]):
        return None
    positions = []
    params = [p for g in groups for p in g["params"]]
    for index, group in enumerate(groups):
        with_grad = [p for p in group["params"] if p.grad is not None]
        if with_grad:
            _tensor_lr(group, with_grad[0].device)
        opt._engine.prepare(index, group, opt._engine.options(index, group), opt.state)
    for i, p in enumerate(params):
        if p.grad is not None:
            positions.append(i)
            grads.append(p.grad)
    buffers.extend(opt._engine.step_buffers(opt.state))
    return tuple(positions)


@torch._dynamo.disable
def _eager_step(opt: NpuFusedRMSprop) -> None:
    opt._engine.step(opt.param_groups, opt.state, opt._amp())


def traced_step(opt: NpuFusedRMSprop) -> None:
    """``opt.step()``'s body under Dynamo: one custom-op call."""
    buffers: list[Tensor] = []
    grads: list[Tensor] = []
    positions = opt._init_group(None, buffers, grads)
    if positions is None:
        _eager_step(opt)
        return
    positions = list(positions)
    generation = opt._engine.generation  # read while tracing: a guard on it
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is None:
        torch.ops.npu_optim_compile.fused_step(buffers, grads, positions, opt._handle, generation)
    else:
        grad_scale = getattr(opt, "grad_scale", None)
        torch.ops.npu_optim_compile.fused_step_amp(
            buffers, grads, positions, grad_scale, found_inf, opt._handle, generation
        )


def traced_zero_grad(opt: NpuFusedRMSprop, set_to_none: bool) -> None:
    """``torch.optim.Optimizer.zero_grad``'s effect, traceable (Dynamo skips the original)."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    if set_to_none:
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = None
    elif grads:
        torch._foreach_zero_(grads)
