"""npu_optim_compile: graph-mode fused RMSprop for PyTorch.

- :class:`NpuFusedRMSprop`: a drop-in for ``torch.optim.RMSprop`` and
  ``torch_npu.optim.NpuFusedRMSprop`` whose step is one compiled kernel per bucket.
- :func:`rmsprop_step`: the traceable functional step, the one source of the math.
- :class:`RMSpropOptions`: every option of a step, its default and its doc.
- :func:`rmsprop_init` / :func:`rmsprop_update`: a pure, jax-style API over pytrees.
- :func:`compile_train_step`: ``torch.compile`` of a whole train step with the
  foreach-fusion pass installed.

Importing this package never imports torch_npu or torchair.
"""

from .functional import rmsprop_step
from .optimizer import NpuFusedRMSprop
from .options import RMSpropOptions
from .presets import NpuFusedRMSpropTF, optax_rmsprop
from .pure import PureRMSprop, RMSpropState, rmsprop_init, rmsprop_update
from .train_step import compile_train_step

__all__ = [
    "NpuFusedRMSprop",
    "NpuFusedRMSpropTF",
    "PureRMSprop",
    "RMSpropOptions",
    "RMSpropState",
    "compile_train_step",
    "optax_rmsprop",
    "rmsprop_init",
    "rmsprop_step",
    "rmsprop_update",
]

__version__ = "0.1.0"
