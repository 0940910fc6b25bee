"""The step Dynamo traces when ``opt.step()`` runs inside a user's ``torch.compile``.

The flat buckets cannot be traced: they compare data pointers and re-point ``p.data``.
Inside a compiled region (``torch.compiler.is_compiling()``) ``NpuFusedRMSprop.step``
therefore runs :func:`traced_step`: :func:`~npu_optim_compile.rmsprop_step` over
per-parameter lists, the ``_foreach_*`` ops then sit in the user's graph, where the
foreach-fusion pass (``compile_train_step``) fuses them with everything else.

Note [Dynamo and _init_group]: Dynamo's ``OptimizerVariable`` (``torch/_dynamo/variables/
optimizer.py``, torch 2.13) does not trace a method named ``_init_group``: it calls it in
Python with the real optimizer, when the arguments are constants, empty lists or
``param_groups[i]``; appends the tensors the call put into those lists to the traced
lists as graph inputs (params, grads and state, with their sources and static-address
guards); and returns the call's result as a constant. :func:`init_group_for_dynamo` is
that method for this class: it creates missing state, gives every tensor its own
storage again (aliased graph inputs that the graph mutates would make AOT autograd
take its slow "synthetic base" path) and returns how many params each group updates.
It runs only while tracing; the compiled graph reads the tensors directly.

Hyperparameters: Dynamo reads a float from ``param_groups`` as a constant and guards on
its value, so an LR scheduler would recompile at every change. The first trace
therefore turns each group's float ``lr`` into a 0-d tensor (``torch.optim``'s own
recipe for compiled optimizers; LR schedulers then ``fill_`` it): a new lr is read at
run time. ``alpha`` and ``eps`` stay numbers (torch.optim.RMSprop's state_dict must load
them), and ``momentum`` / ``weight_decay`` decide the graph's structure; changing any
of them recompiles.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._buckets import init_state

__all__ = ["init_group_for_dynamo", "traced_step", "traced_zero_grad"]


def _tensor_lr(group: dict, device: torch.device) -> None:
    lr = group["lr"]
    if not isinstance(lr, Tensor):
        # float64 as the eager step's hyperparameter tensor (optimizer._hyper_dtype).
        dtype = torch.float32 if device.type == "npu" else torch.float64
        group["lr"] = torch.tensor(float(lr), dtype=dtype, device=device)


def init_group_for_dynamo(
    opt, _group, params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps
) -> tuple[int, ...]:
    """Fill the lists for every param group; return each group's number of params.

    Called by Dynamo in Python, not traced (see Note [Dynamo and _init_group]).
    """
    for layout in opt._layouts.values():
        for bucket in layout.buckets:
            bucket.release(opt.state)
    opt._layouts.clear()  # the next eager step gathers again
    counts = []
    for group in opt.param_groups:
        ps = [p for p in group["params"] if p.grad is not None]
        counts.append(len(ps))
        if not ps:
            continue
        _tensor_lr(group, ps[0].device)
        options = opt._group_options(group)
        roles = ("square_avg",) + (("grad_avg",) if group["centered"] else ()) + (
            ("momentum_buffer",) if group["momentum"] > 0 else ()
        )
        for p in ps:
            if p.grad.is_sparse:
                raise RuntimeError("NpuFusedRMSprop does not support sparse gradients")
            st = opt.state[p]
            init_state(st, p, roles, options["initial_square_avg"])
            params.append(p)
            grads.append(p.grad)
            square_avgs.append(st["square_avg"])
            grad_avgs.extend([st["grad_avg"]] if "grad_avg" in roles else [])
            momentum_buffers.extend([st["momentum_buffer"]] if "momentum_buffer" in roles else [])
            state_steps.append(st["step"])
    return tuple(counts)


def traced_step(opt) -> None:
    """``opt.step()``'s body under Dynamo: per-group :meth:`_step_tensors` over lists."""
    params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps = [], [], [], [], [], []
    counts = opt._init_group(None, params, grads, square_avgs, grad_avgs, momentum_buffers, state_steps)
    grad_scale = getattr(opt, "grad_scale", None)
    found_inf = getattr(opt, "found_inf", None)
    start = start_ga = start_mb = 0
    for group, n in zip(opt.param_groups, counts):
        if n == 0:
            continue
        centered, use_momentum = bool(group["centered"]), group["momentum"] > 0
        opt._step_tensors(
            group,
            opt._group_options(group),
            params[start : start + n],
            grads[start : start + n],
            square_avgs[start : start + n],
            grad_avgs[start_ga : start_ga + n] if centered else None,
            momentum_buffers[start_mb : start_mb + n] if use_momentum else None,
            state_steps[start : start + n],
            grad_scale,
            found_inf,
        )
        start += n
        start_ga += n if centered else 0
        start_mb += n if use_momentum else 0


def traced_zero_grad(opt, set_to_none: bool) -> None:
    """``torch.optim.Optimizer.zero_grad``'s effect, traceable (Dynamo skips the original)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                if p.grad.grad_fn is not None:
                    p.grad.detach_()
                else:
                    p.grad.requires_grad_(False)
                p.grad.zero_()
