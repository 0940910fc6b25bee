"""torchair adapter: the foreach fusion pass with torchair's custom-pass signature.

torchair calls ``post_grad_custom_pre_pass(gm, example_inputs, config)`` on a copy of the
post-AOT graph and ignores the return value, so the graph module is rewritten in place::

    cfg = torchair.CompilerConfig()
    cfg.post_grad_custom_pre_pass = torchair_foreach_fusion
    # or functools.partial(torchair_foreach_fusion, options=FusionOptions(...))

torchair is never imported here: the signature is all the adapter relies on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from .foreach_fusion import FusionOptions, FusionStats, fuse_foreach_ops


def torchair_foreach_fusion(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: Any,
    *,
    options: FusionOptions | None = None,
) -> FusionStats:
    """Rewrites ``gm.graph`` in place and recompiles ``gm``; ``target`` is ``"torchair"``.

    ``example_inputs`` (FakeTensors) and ``config`` (torchair's ``CompilerConfig``) are
    accepted for the signature and not read: node ``meta["val"]`` carries what is needed.
    """
    del example_inputs, config
    options = dataclasses.replace(options or FusionOptions(), target="torchair")
    stats = fuse_foreach_ops(gm.graph, options=options)
    gm.recompile()
    return stats
