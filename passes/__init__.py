"""FX passes that fuse foreach ops horizontally (installed as npu_optim_compile.passes).

Public surface:

* :func:`fuse_foreach_ops` (the pass core over a ``torch.fx.Graph``), with
  :class:`FusionOptions` and :class:`FusionStats`;
* :class:`ForeachFusionPass`: the inductor adapter (``post_grad_custom_pre_pass``);
* :func:`torchair_foreach_fusion`: the torchair adapter;
* :data:`EMITTED_OPS` / :data:`INDUCTOR_EMITTED_OPS`: every overload the pass may emit.
"""

from ._lowering import EMITTED_OPS, INDUCTOR_EMITTED_OPS, SUPPORTED_FOREACH_OPS
from .foreach_fusion import FusionOptions, FusionStats, fuse_foreach_ops
from .inductor import ForeachFusionPass
from .torchair import torchair_foreach_fusion

__all__ = [
    "EMITTED_OPS",
    "INDUCTOR_EMITTED_OPS",
    "SUPPORTED_FOREACH_OPS",
    "ForeachFusionPass",
    "FusionOptions",
    "FusionStats",
    "fuse_foreach_ops",
    "torchair_foreach_fusion",
]
