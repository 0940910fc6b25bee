"""npu_optim_compile: graph-mode fused RMSprop for PyTorch.

- :class:`NpuFusedRMSprop`: a drop-in for ``torch.optim.RMSprop`` and
  ``torch_npu.optim.NpuFusedRMSprop`` whose step is one compiled kernel per bucket.
- :func:`rmsprop_step`: the traceable functional step, the one source of the math.
- :class:`RMSpropOptions`: every option of a step, its default and its doc.
- :func:`rmsprop_init` / :func:`rmsprop_update`: a pure, jax-style API over pytrees.
- :func:`compile_train_step`: ``torch.compile`` of a whole train step with the
  foreach-fusion pass installed.
- :func:`ascend_dry_run`: torchair's real FX-to-GE conversion on a machine without an
  NPU (loaded on first use).

Importing this package never imports torch_npu or torchair.
"""

import torch as _torch

from ._torch_version import check_torch_version as _check_torch_version

_check_torch_version(_torch.__version__)  # before any module that needs a newer torch

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
    "ascend_dry_run",
    "compile_train_step",
    "optax_rmsprop",
    "rmsprop_init",
    "rmsprop_step",
    "rmsprop_update",
]

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "ascend_dry_run":  # lazy: the dry run's modules load only when used
        from ._dry_run import ascend_dry_run

        return ascend_dry_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
