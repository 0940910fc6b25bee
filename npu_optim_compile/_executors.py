"""How one bucket's step runs (``_plan.Bucket.kind``), and the per-tensor step.

- ``"segments"`` (CPU, inductor): one call of the compiled kernel's driver over every
  param, grad and state tensor where it lives (``_segments.py``); the driver also
  advances the step counts. No copy, nothing per parameter in Python.
- ``"staged"`` (other devices, and CPU structures whose step is not elementwise): the
  bucket's params, grads and state are copied into flat staging buffers (one
  ``torch.cat`` per role), the compiled bucket step runs on them, and the new params and
  state are copied back (one ``_foreach_copy_`` per role). The staging buffers are
  allocated per step (an accelerator's caching allocator makes that cheap), so
  persistent memory stays torch's.
- ``"flat"`` (a combined chunk on an accelerator, ``_combined.py``): the compiled bucket
  step on the chunk's own buffers; grads that are not in their slot of the chunk's flat
  grad buffer are copied in first.
- loose params: :func:`step_tensors`, ``rmsprop_step`` on lists, eagerly (what
  ``torch.optim.RMSprop(foreach=True)`` runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._bucket_step import segments_like
from ._ownership import local_tensors
from ._plan import Bucket
from ._segments import SegmentKernel, SegmentTable
from ._tensors import DATA_PTR, math_view
from .functional import rmsprop_step
from .options import STATE_ROLES, RMSpropOptions

__all__ = ["run_flat", "run_segments", "run_staged", "step_loose"]


def run_segments(bucket: Bucket, kernel: SegmentKernel, ptrs: tuple[int, ...], hyper: Tensor,
                 found_inf: Tensor | None, roles: Sequence[str]) -> None:
    """``ptrs``: the data pointers of the bucket's grads."""
    table = bucket.cache.get("table")
    if table is None:
        table = bucket.cache["table"] = SegmentTable(bucket.params, bucket.states, roles)
        bucket.cache["grad_ptrs"] = None
    if ptrs != bucket.cache["grad_ptrs"]:
        table.set_grads(ptrs)
        bucket.cache["grad_ptrs"] = ptrs
    kernel.run(table, hyper, found_inf)
    # The kernel wrote through raw pointers: tell autograd, so a graph that saved a
    # param before the step fails on backward, as with torch.
    torch.autograd.graph.increment_version(bucket.params)


def _flat(tensors: Sequence[Tensor]) -> Tensor:
    out = torch.cat(list(map(torch.flatten, tensors)))
    view = math_view(out)
    torch._dynamo.maybe_mark_dynamic(view, 0)  # one compiled graph for every size
    return view


def _caution_segments(bucket: Bucket, flat: Tensor) -> tuple[Tensor, Tensor]:
    segments = bucket.cache.get("segments")
    if segments is None:
        per = 2 if bucket.dtype.is_complex else 1
        segments = bucket.cache["segments"] = segments_like(flat, [p.numel() * per for p in bucket.params], True)
    return segments


def _advance(steps: Sequence[Tensor] | Tensor, found_inf: Tensor | None) -> None:
    """Step counts += 1, or += 1 - found_inf (on the steps' device, no synchronisation)."""
    if isinstance(steps, Tensor):
        steps.add_(1 if found_inf is None else 1 - found_inf.to(steps.device, non_blocking=True))
    elif found_inf is None:
        torch._foreach_add_(list(steps), 1)
    else:
        torch._foreach_add_(list(steps), 1 - found_inf.to(steps[0].device, non_blocking=True))


def run_staged(bucket: Bucket, fn: Callable, grads: Sequence[Tensor], hyper: Tensor, found_inf: Tensor | None,
               options: RMSpropOptions) -> None:
    roles = options.roles
    args = [_flat(bucket.params), _flat(grads)]
    args += [_flat([st[role] for st in bucket.states]) if role in roles else None for role in STATE_ROLES]
    segments = _caution_segments(bucket, args[0]) if options.caution else (None, None)
    fn(*args, hyper, found_inf, *segments)
    numels = [p.numel() for p in bucket.params]
    targets = bucket.cache.get("targets")
    if targets is None:  # the params and state, as 1-D views where they are contiguous
        flat_view = bucket.contiguous
        targets = bucket.cache["targets"] = [
            [t.view(-1) if flat_view else t for t in tensors]
            for tensors in [bucket.params, *([st[role] for st in bucket.states] for role in roles)]
        ]
    sources = [args[0]] + [args[2 + STATE_ROLES.index(role)] for role in roles]
    for views, flat in zip(targets, sources):
        pieces = torch.split(torch.view_as_complex(flat) if flat.dim() == 2 else flat, numels)
        if not bucket.contiguous:  # (flatten read them in logical order)
            pieces = [piece.view(shape) for piece, shape in zip(pieces, bucket.shapes)]
        torch._foreach_copy_(views, list(pieces))
    _advance([st["step"] for st in bucket.states], found_inf)


def run_flat(bucket: Bucket, fn: Callable, grads: Sequence[Tensor], hyper: Tensor, found_inf: Tensor | None,
             options: RMSpropOptions) -> None:
    chunk = bucket.chunk
    args = bucket.cache.get("args")
    if args is None:
        def arg(flat: Tensor | None) -> Tensor | None:
            if flat is None:
                return None
            view = math_view(flat)
            torch._dynamo.maybe_mark_dynamic(view, 0)
            return view

        args = bucket.cache["args"] = [arg(chunk.param), arg(chunk.grad)] + [arg(chunk.state.get(r)) for r in STATE_ROLES]
        bucket.cache["slot_ptrs"] = tuple(chunk.grad_slot(i).data_ptr() for i in range(len(chunk.params)))
    if tuple(map(DATA_PTR, grads)) != bucket.cache["slot_ptrs"]:
        lo = chunk.grad.data_ptr()
        hi = lo + chunk.grad.numel() * chunk.grad.element_size()
        sources = [g.clone() if lo <= g.data_ptr() < hi else g for g in grads]  # cat may not read its output
        with torch._C._AutoDispatchBelowADInplaceOrView():  # a step never bumps a grad's version
            torch.cat(list(map(torch.flatten, sources)), out=chunk.grad)
    segments = _caution_segments(bucket, args[0]) if options.caution else (None, None)
    fn(*args, hyper, found_inf, *segments)
    _advance(chunk.steps, found_inf)
    torch.autograd.graph.increment_version(bucket.params)


def step_loose(params: list[Tensor], grads: Sequence[Tensor], options: RMSpropOptions, state: dict,
               found_inf: Tensor | None) -> None:
    """The per-tensor step for params that are not in a bucket.

    A param listed twice in a group is updated twice, one update after the other, as
    torch.optim.RMSprop does (it warns about the duplicate at construction): the params
    go in rounds in which each appears at most once."""
    rounds: list[list[int]] = []
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        k = seen[id(p)] = seen.get(id(p), -1) + 1
        if k == len(rounds):
            rounds.append([])
        rounds[k].append(i)
    for indices in rounds:
        ps = [params[i] for i in indices]
        _step_tensors(ps, [grads[i] for i in indices], [state[p] for p in ps], options, found_inf)
    torch.autograd.graph.increment_version(params)


def _step_tensors(params, grads, states, options: RMSpropOptions, found_inf: Tensor | None) -> None:
    # DTensors (FSDP2) are updated through their local shards; their state stays DTensor.
    steps = [st["step"] for st in states]

    def role(name: str) -> list[Tensor] | None:
        return local_tensors([st[name] for st in states]) if name in options.roles else None

    rmsprop_step(
        local_tensors(params),
        local_tensors(grads, like=params),
        role("square_avg"),
        role("grad_avg"),
        role("momentum_buffer"),
        state_steps=[t + 1 for t in steps] if options.bias_correction else None,
        found_inf=found_inf,
        **options.step_kwargs(),
    )
    _advance(steps, found_inf)
