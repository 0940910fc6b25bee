"""Every check of user input, with one wording: torch.optim.RMSprop's where it has one.

The optimizer, the pure API, the presets and the functional step all raise from here,
so one kind of mistake reads the same whichever API made it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_dump_dir",
    "check_hyperparameters",
    "check_loss_scale",
    "check_option_combination",
    "check_param_dtype",
    "check_positive",
    "check_sparse",
]

#: torch.optim.RMSprop's messages (torch/optim/rmsprop.py), by argument name.
_TORCH_MESSAGES = {
    "lr": "Invalid learning rate: {}",
    "eps": "Invalid epsilon value: {}",
    "momentum": "Invalid momentum value: {}",
    "weight_decay": "Invalid weight_decay value: {}",
    "alpha": "Invalid alpha value: {}",
}


def check_hyperparameters(**values: Any) -> None:
    """For the hyperparameters given (``lr``, ``eps``, ``momentum``, ``weight_decay``,
    ``alpha``, ``loss_scale``): ``TypeError`` for one that is neither a real number nor
    a tensor (``None`` included: torch.optim.RMSprop raises ``TypeError`` for it too,
    where it would otherwise run as 0); ``ValueError`` for a negative ``lr``, ``eps``,
    ``momentum``, ``weight_decay`` or ``alpha`` (torch's messages, in torch's order), a
    ``loss_scale`` not > 0 and a tensor lr that is not 1-element. Tensors other than lr
    are checked when they are 1-element."""
    for name, value in values.items():
        if not isinstance(value, (numbers.Real, Tensor)):
            raise TypeError(f"Invalid {name} value: {value!r} ({name} must be a real number or a tensor)")
    lr = values.get("lr")
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    for name, template in _TORCH_MESSAGES.items():
        if name not in values:
            continue
        value = values[name]
        if isinstance(value, Tensor):  # checked where its value can be read without a trace
            if value.numel() != 1 or value.device.type == "meta" or torch.compiler.is_compiling():
                continue
            value = value.detach()
        if not 0.0 <= value:
            raise ValueError(template.format(value))
    if "loss_scale" in values:
        check_loss_scale(values["loss_scale"])


def check_positive(name: str, value: float | Tensor, why: str = "must be > 0") -> None:
    """``ValueError`` for a number that is not > 0 (a tensor is not checked)."""
    if not isinstance(value, Tensor) and not value > 0:
        raise ValueError(f"Invalid {name} value: {value} ({why})")


def check_loss_scale(loss_scale: float | Tensor) -> None:
    """``ValueError`` for a number loss scale that is not > 0."""
    check_positive("loss_scale", loss_scale)


def check_option_combination(
    *,
    momentum_buffers: bool,
    nesterov: bool,
    loss_scale: float | Tensor = 1.0,
    initial_square_avg: float = 0.0,
    corrected_weight_decay: bool = False,
    max_lr: float | Tensor | None = None,
    lr_scaled_decay: bool = True,
) -> None:
    """``ValueError`` for option values and combinations that make no sense (one
    wording for the optimizer, the pure API and :func:`~npu_optim_compile.rmsprop_step`)."""
    if corrected_weight_decay:
        if max_lr is None or (not isinstance(max_lr, Tensor) and not max_lr > 0):
            raise ValueError(f"Invalid max_lr value: {max_lr} (corrected_weight_decay=True needs max_lr > 0)")
        if not lr_scaled_decay:
            raise ValueError("corrected_weight_decay=True needs lr_scaled_decay=True")
    if nesterov and not momentum_buffers:
        raise ValueError("nesterov=True needs momentum: set momentum > 0 (or pass momentum buffers)")
    check_loss_scale(loss_scale)
    if not initial_square_avg >= 0:
        raise ValueError(f"Invalid initial_square_avg value: {initial_square_avg} (must be >= 0)")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    """``ValueError`` naming the argument and listing the valid values."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"Invalid {name}: {value!r}. Choose one of {', '.join(map(repr, choices))}")


def check_param_dtype(p: Tensor) -> None:
    """``TypeError`` for a parameter with a grad that is neither floating point nor
    complex. (torch.optim.RMSprop accepts such a parameter at construction, e.g. an int64
    one with ``requires_grad=False``; so do we: it can only fail when it has a grad.)"""
    if not (p.is_floating_point() or p.is_complex()):
        raise TypeError(
            f"RMSprop can only update floating point or complex parameters, but a parameter "
            f"of dtype {p.dtype} has a grad"
        )


def check_sparse(grad: Tensor) -> None:
    """torch.optim.RMSprop's error for sparse gradients."""
    if grad.is_sparse:
        raise RuntimeError("RMSprop does not support sparse gradients")


def check_dump_dir(value: str | os.PathLike[str], source: str) -> str:
    """The graph-dump folder as a string, created if missing; ``ValueError`` naming
    ``source`` (the argument or the environment variable) when it cannot be written."""
    path = Path(value)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".npu_optim_compile-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(
            f"{source}={str(value)!r} is not a writable folder for graph dumps ({e.strerror or e}); "
            f"give a folder you can write to, or unset it"
        ) from e
    return str(path)
