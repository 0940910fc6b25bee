"""Compile a whole training step (forward, backward, ``opt.step()``, ``opt.zero_grad()``).

::

    def train_step(x, y):
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss

    train_step = compile_train_step(train_step)

Inside the compiled region ``NpuFusedRMSprop.step`` is one custom op running the fused
engine, and ``zero_grad`` a traceable equivalent of torch's, with no graph break
(``_in_compile.py``). The foreach-fusion pass installed here fuses any other foreach
ops of the user's graph into a few pointwise kernels. Dynamo itself still breaks the
graph at ``loss.backward()`` (torch 2.13 traces no ``Tensor.backward`` by default), so
a train step compiles to two graphs: the forward, and the optimizer step after the
backward.

The first trace turns a float ``lr`` into a 0-d tensor in the param groups, so LR
schedulers change it without recompiling (``_in_compile.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compile_train_step"]


def _fusion_pass(backend: str) -> Any | None:
    """The foreach-fusion pass for ``backend``, or None where it is not installed."""
    try:
        if backend == "inductor":
            from .passes import ForeachFusionPass

            return ForeachFusionPass()
        if backend == "torchair":
            from .passes import torchair_foreach_fusion

            return torchair_foreach_fusion
    except ImportError:  # a build without passes/: compile without the fusion
        return None
    return None


def compile_train_step(
    fn: Callable, *, backend: str = "inductor", fuse_foreach: bool = True, **compile_kwargs: Any
) -> Callable:
    """``torch.compile(fn, ...)`` with the foreach-fusion pass installed for this compile.

    Args:
        fn: the training step (or any function); it may call ``opt.step()`` and
            ``opt.zero_grad()`` of an :class:`~npu_optim_compile.NpuFusedRMSprop`.
        backend: ``"inductor"`` (the pass runs as ``post_grad_custom_pre_pass``),
            ``"torchair"`` (through ``torchair.get_npu_backend``'s config, on an Ascend
            machine) or any other ``torch.compile`` backend (no pass).
        fuse_foreach: install the pass (where the backend takes one).
        compile_kwargs: passed to ``torch.compile`` (``fullgraph``, ``dynamic``,
            ``mode``, ``options``...). For inductor, ``options`` is merged with the pass.

    Returns:
        The compiled function. Its attribute ``fusion_pass`` is the pass instance (for
        inductor, ``fusion_pass.history`` lists what the pass did per graph) or None.
    """
    fusion = _fusion_pass(backend) if fuse_foreach else None
    if backend == "torchair":
        from ._torchair_backend import make_torchair_backend  # lazy: never at package import

        compiled = torch.compile(fn, backend=make_torchair_backend(post_grad_pass=fusion), **compile_kwargs)
    elif backend == "inductor" and fusion is not None:
        options = {**(compile_kwargs.pop("options", None) or {}), "post_grad_custom_pre_pass": fusion}
        compiled = torch.compile(fn, backend="inductor", options=options, **compile_kwargs)
    else:
        compiled = torch.compile(fn, backend=backend, **compile_kwargs)
    try:
        compiled.fusion_pass = fusion
    except AttributeError:  # a wrapper that takes no attributes
        pass
    return compiled
