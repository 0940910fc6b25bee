"""torch_npu's tensor-fusion API: ``get_combined_params``, ``get_combined_grads``,
``clip_grad_norm_fused_``, as a mixin of the optimizer facade.

The combined buffers exist only when the optimizer combines params
(``NpuFusedRMSprop(combine_params=True)``, ``_combined.py``); ``clip_grad_norm_fused_``
works either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._combined import Chunk
from ._ownership import is_foreign

__all__ = ["TensorFusionAPI"]


class TensorFusionAPI:
    """Methods for an optimizer with a ``_engine`` (``_engine.StepEngine``)."""

    def _planned(self) -> list:
        """Every group's step work as of now (plans made, new params combined)."""
        out = []
        for index, group in enumerate(self.param_groups):
            work = self._engine.prepare(index, group, self._engine.options(index, group), self.state)
            if work is not None:
                out.append(work)
        return out

    def _chunks(self, what: str) -> list[Chunk]:
        combiner = self._engine.combiner
        if combiner is None:
            raise RuntimeError(
                f"{what} needs params combined into flat buffers: construct the optimizer with "
                f"combine_params=True (by default params stay separate tensors, as in torch.optim)"
            )
        self._planned()
        return [c for c in combiner.chunks if c.in_place()]

    def get_combined_params(self) -> list[Tensor]:
        """The flat param buffers (torch_npu's ``get_combined_params``): one per set of
        params of one group, device and dtype combined together (``combine_params=True``;
        torch_npu combines per dtype across groups). Each combined param is a view of
        one of them, in the order the params got their first grad."""
        return [c.param for c in self._chunks("get_combined_params()")]

    def get_combined_grads(self) -> list[Tensor]:
        """The flat grad buffers, chunk by chunk (torch_npu's ``get_combined_grads``).
        Each combined param's ``.grad`` is pointed at its slot first (its values copied
        in, as ``zero_grad(set_to_none=False)`` then backward would leave them), so
        writing into the buffers writes the grads."""
        chunks = self._chunks("get_combined_grads()")
        with torch.no_grad():
            for chunk in chunks:
                _point_grads_at_slots(chunk, copy=True)
        return [c.grad for c in chunks]

    @torch.no_grad()
    def clip_grad_norm_fused_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the grads of all groups to a total norm of ``max_norm``, in place:
        ``torch.nn.utils.clip_grad_norm_``'s result, with one norm per combined flat grad
        buffer where params are combined. Returns the total norm before clipping."""
        work = self._planned()
        combiner = self._engine.combiner
        combined = [
            c for c in (combiner.chunks if combiner is not None else ())
            if c.in_place() and all(p.grad is not None for p in c.params)
        ]
        for chunk in combined:
            _point_grads_at_slots(chunk, copy=True)
        inside = {id(p) for c in combined for p in c.params}
        grads = [c.grad for c in combined] + [
            g for item in work for p, g in zip(item.plan.params, item.grads) if id(p) not in inside
        ]
        if not grads:
            return torch.tensor(0.0)
        norm_type = float(norm_type)
        norms = [torch.linalg.vector_norm(g, norm_type) for g in grads]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        return total


def _point_grads_at_slots(chunk: Chunk, *, copy: bool) -> list[Tensor]:
    """Point each grad of ``chunk``'s params at its slot of the flat grad buffer; with
    ``copy`` the grad's values are copied in first (and the slots of params without a
    grad are zeroed), else the slot is left as it is. A param without a grad keeps
    None, and a grad another engine owns (DDP's bucket views) is not re-pointed.
    Returns the grad tensors that were replaced (torch's ``zero_grad`` zeroes those)."""
    replaced = []
    for i, p in enumerate(chunk.params):
        g = p.grad
        slot = chunk.grad_slot(i)
        if g is None:
            if copy:
                slot.zero_()
            continue
        if g.data_ptr() == slot.data_ptr() or is_foreign(g):
            continue
        if copy:
            slot.copy_(g)
        replaced.append(g)
        p.grad = slot
    return replaced
