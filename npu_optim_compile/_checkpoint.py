"""What ``NpuFusedRMSprop.load_state_dict`` checks before torch's own loading.

torch.optim's ``load_state_dict`` takes any per-parameter dict: another optimizer's
state, an entry without ``square_avg``, a buffer of another shape. Each would train on
silently wrong state here, so the checkpoint is checked first, naming the param and the
key that do not fit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .options import STATE_ROLES, RMSpropOptions

__all__ = ["check_state_dict"]


def check_state_dict(opt: NpuFusedRMSprop, state_dict: Mapping[str, Any]) -> None:
    """``ValueError`` when ``state_dict`` is not an RMSprop state for ``opt``'s params:
    each per-parameter entry must hold ``step`` and the buffers its group's options
    keep, each of its param's shape. (Extra keys are kept, as torch keeps them.)"""
    saved_groups = state_dict.get("param_groups", [])
    saved_state = state_dict.get("state", {})
    if len(saved_groups) != len(opt.param_groups):
        return  # torch's own check reports this one
    for index, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
        roles = RMSpropOptions.from_group(merged, opt._group_aliases).roles
        for position, (p, key) in enumerate(zip(group["params"], saved.get("params", []))):
            entry = saved_state.get(key)
            if entry is None:
                continue
            where = f"param group {index}, parameter {position} (state key {key!r})"
            if not isinstance(entry, Mapping):
                raise ValueError(f"state_dict: the state of {where} is a {type(entry).__name__}, not a dict")
            missing = [k for k in ("step", *roles) if k not in entry]
            if missing:
                raise ValueError(
                    f"state_dict: the state of {where} has no {', '.join(map(repr, missing))} "
                    f"(it holds {sorted(entry)}): not an RMSprop state for these options"
                )
            for role in STATE_ROLES:
                value = entry.get(role)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"state_dict: {role!r} of {where} has shape {tuple(value.shape)}, "
                        f"the parameter {tuple(p.shape)}"
                    )
