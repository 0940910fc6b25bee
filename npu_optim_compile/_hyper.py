"""The hyperparameters a compiled bucket step reads at run time, in one 1-D tensor.

Note [hyperparameters in one 1-D tensor]: not five 0-d tensors. Fake-tensor conversion
gives every 0-d CPU float64 input an ``item()`` symbol; tensorification then restarts
the trace, so a cold compile traced twice (torch 2.13). Elements selected inside the
graph are 0-d, so they still do not promote the dtype of the buffers they scale.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._npu import is_npu_device
from .options import RMSpropOptions

__all__ = ["HYPER_LAYOUT", "HyperTensor", "hyper_dtype"]

#: The values a bucket step reads at run time, in the order of its hyper tensor: the
#: options of kind VALUE (in ``RMSpropOptions``' field order), then the bucket's step
#: count (for bias correction).
HYPER_LAYOUT = RMSpropOptions.value_names() + ("step",)


def hyper_dtype(device: torch.device) -> torch.dtype:
    """float64 reproduces torch's Python-float arithmetic (``1 - alpha``, ``-lr``)
    exactly; the Ascend graph engines handle float32 scalars best."""
    return torch.float32 if is_npu_device(device) else torch.float64


class HyperTensor:
    """One bucket's :data:`HYPER_LAYOUT` values in one 1-D tensor on its device,
    refreshed before each step (a copy only when a value changed; tensor values, which
    may change in place, are copied every time, on the device)."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(len(HYPER_LAYOUT), dtype=hyper_dtype(device), device=device)
        self._seen: tuple | None = None

    def refresh(self, options: RMSpropOptions, step: Tensor | None = None) -> Tensor:
        values = tuple(getattr(options, name) for name in HYPER_LAYOUT[:-1])
        numbers = tuple(None if isinstance(v, Tensor) else v for v in values)
        if numbers != self._seen:  # (an unset value, max_lr without corrected decay, reads 0)
            staged = torch.tensor([0.0 if v is None else v for v in numbers] + [0.0], dtype=self.tensor.dtype)
            if self.tensor.device.type != "cpu":  # no host synchronisation
                staged = staged.pin_memory()
            self.tensor.copy_(staged, non_blocking=True)
            self._seen = numbers
        for i, v in enumerate(values):
            if isinstance(v, Tensor):
                self.tensor[i].copy_(v.detach().reshape(()), non_blocking=True)
        if step is not None:
            self.tensor[-1].copy_(step, non_blocking=True)
        return self.tensor
