"""Where a tolerance is in doubt: measure ours and torch against a float64 run.

A difference between ours and ``torch.optim.RMSprop`` in fp32 is either rounding (each
is off from the exact result by a few ulps, in different directions) or a real
difference (ours is further off). Running the same training in float64 with torch's
optimizer gives a stand-in for the exact result; the errors of ours and of torch
against it tell the two cases apart without choosing a tolerance::

    errors = errors_against_fp64(run, make_ours)   # run(make_opt, dtype, inputs) -> {name: tensor}
    print(format_errors(errors))
    assert_as_accurate_as_torch(errors)

``run(make_opt, dtype, inputs)`` trains in ``dtype`` from seeded initial values and
grads rounded to ``inputs`` first (so that the float64 run starts from exactly the
values the others start from), and returns every tensor to compare by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Run = Callable[[Callable, torch.dtype, torch.dtype], dict[str, Tensor]]


@dataclass(frozen=True)
class Errors:
    """Max absolute errors against the float64 run, and that run's max magnitude."""

    ours: float
    torch: float
    scale: float


def _max_abs(t: Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def errors_against_fp64(run: Run, make_ours: Callable, *, dtype=torch.float32) -> dict[str, Errors]:
    """Run ``run`` with ours and torch's RMSprop in ``dtype`` and torch's in float64."""
    ours = run(make_ours, dtype, dtype)
    theirs = run(torch.optim.RMSprop, dtype, dtype)
    exact = run(torch.optim.RMSprop, torch.float64, dtype)
    assert set(ours) == set(theirs) == set(exact), (sorted(ours), sorted(theirs), sorted(exact))
    out = {}
    for name, e in exact.items():
        e = e.detach().to(torch.float64)
        out[name] = Errors(
            ours=_max_abs(ours[name].detach().to(torch.float64) - e),
            torch=_max_abs(theirs[name].detach().to(torch.float64) - e),
            scale=_max_abs(e),
        )
    return out


def format_errors(errors: dict[str, Errors]) -> str:
    rows = [f"{'tensor':<28} {'ours vs fp64':>13} {'torch vs fp64':>14} {'max |fp64|':>11}"]
    rows += [f"{k:<28} {v.ours:13.3e} {v.torch:14.3e} {v.scale:11.3e}" for k, v in errors.items()]
    return "\n".join(rows)


def assert_as_accurate_as_torch(errors: dict[str, Errors], *, dtype=torch.float32, factor=2.0, ulps=4.0) -> None:
    """Ours is at most ``factor`` times torch's error against float64, plus ``ulps`` units
    in the last place of the largest value (both round; neither is exact)."""
    eps = torch.finfo(dtype).eps
    bad = {k: v for k, v in errors.items() if v.ours > factor * v.torch + ulps * eps * v.scale}
    assert not bad, "ours is less accurate than torch.optim.RMSprop:\n" + format_errors(bad)
