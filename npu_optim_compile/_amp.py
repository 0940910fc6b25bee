"""GradScalers' two contracts with an optimizer that sets ``_step_supports_amp_scaling``.

- ``torch.amp.GradScaler`` (the current one) sets ``optimizer.grad_scale`` and
  ``optimizer.found_inf`` as tensors before it calls ``step()``: the step unscales the
  grads in place and skips on inf inside the compiled kernel, with no host sync.
- torch_npu's ``torch_npu.npu.amp.GradScaler`` (the legacy one) calls
  ``step(grad_scaler=scaler)`` and leaves the rest to the optimizer: :func:`adopt_legacy`
  does with it what the current contract does. It reads the scaler's per-optimizer
  state (``_per_optimizer_states``, ``_check_inf_per_device``), which is private to
  torch's GradScaler and torch_npu's subclass of it (torch 2.13, torch_npu 2.13.0).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["Amp", "adopt_legacy", "amp_of", "forget_legacy"]


@dataclass(frozen=True)
class Amp:
    """What a GradScaler hands the step: its scale (None when the grads are already
    unscaled) and its found-inf flag."""

    grad_scale: Tensor | None
    found_inf: Tensor | None


def amp_of(opt) -> Amp:
    """The scale and flag a current GradScaler set on ``opt`` (Nones without one)."""
    return Amp(getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None))


def adopt_legacy(opt, scaler) -> None:
    """The legacy contract, done as the current one: the scaler checks the grads for
    inf/NaN (which records what ``scaler.update()`` reads), and the step unscales them
    in place and skips on inf. fp16 grads are fine here (``unscale_`` refuses them for
    non-fused optimizers)."""
    state = scaler._per_optimizer_states[id(opt)]
    if state["stage"].name == "READY":
        check = getattr(scaler, "_check_inf_per_device", None)
        if check is not None:
            check(opt)
            opt.grad_scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else scaler._scale
        else:  # a scaler without the check: let it unscale the grads itself
            scaler.unscale_(opt)
    found = list(state["found_inf_per_device"].values())
    opt.found_inf = sum(t.to(found[0].device, non_blocking=True) for t in found[1:]) + found[0]


def forget_legacy(opt) -> None:
    """Drop what :func:`adopt_legacy` set, after the step."""
    opt.__dict__.pop("found_inf", None)
    opt.__dict__.pop("grad_scale", None)
