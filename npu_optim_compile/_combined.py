"""Combined params (``NpuFusedRMSprop(combine_params=True)``): torch_npu's tensor fusion.

By default params, grads and state stay where torch has them. With
``combine_params=True`` the params of a param group, device and dtype that get their
first grad in the same step are moved into one flat buffer (a :class:`Chunk`), and so
are their state tensors: ``p`` and ``optimizer.state[p][...]`` become views of the
chunk's buffers. That is what torch_npu's ``get_combined_params``,
``get_combined_grads`` and ``clip_grad_norm_fused_`` work on, and on an accelerator the
compiled step then runs on the buffers themselves.

What combining keeps:

- A param is combined once, at its first step with a grad, and stays where it is from
  then on: chunks are never gathered again, so an alias taken after that (``p.detach()``,
  ``model.state_dict()``, a kept ``opt.state_dict()``) follows the param.
- On the CPU each combined param gets a storage object of its own over its slice of the
  buffer (``torch.from_numpy`` of a NumPy view, which keeps the buffer alive), so tools
  that look at storages (``safetensors.torch.save_model``, accelerate's ``save_state``)
  see separate tensors, as without combining. On other devices the params share one
  storage, as torch_npu's do.
- A param is never combined, and stays the user's (updated in place, as without
  combining), when it cannot be re-pointed safely: someone else holds its storage
  (``_ownership.is_foreign``: a view, a kept ``model.state_dict()``, ZeRO's or FSDP's
  buffers, a DTensor), it is in shared memory (``model.share_memory()``), its memory
  overlaps another param's, another optimizer combined it already, or it moved out of
  its chunk after being combined (``p.data = t``, ``model.to()``, ``share_memory()``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ._ownership import is_foreign, register_flat
from ._tensors import DATA_PTR, is_non_overlapping_and_dense

__all__ = ["Chunk", "Combiner"]

#: Every param some optimizer of this process combined, and the combiner that did (keyed
#: by identity: a tensor's ``==`` is elementwise).
_combined_by: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _piece(flat: Tensor, offset: int, like: Tensor) -> Tensor:
    """A view of ``flat`` at element ``offset`` laid out like ``like``: on the CPU in a
    storage object of its own (which keeps ``flat`` alive), elsewhere in ``flat``'s."""
    n = like.numel()
    if flat.device.type == "cpu":
        size = flat.element_size()
        raw = flat.view(torch.uint8).numpy()[offset * size : (offset + n) * size]
        base = torch.from_numpy(raw).view(flat.dtype)
        return base.as_strided(like.shape, like.stride(), 0)
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


@dataclass(eq=False)
class Chunk:
    """The flat buffers of params combined together: one per role, and the step counts."""

    params: list[Tensor]
    roles: tuple[str, ...]
    param: Tensor
    state: dict[str, Tensor]
    steps: Tensor
    offsets: list[int]
    #: Where each param lives while it is combined.
    ptrs: tuple[int, ...] = field(init=False)
    #: The flat grad buffer, allocated on first use (``get_combined_grads``,
    #: ``zero_grad(set_to_none=False)``, an accelerator's in-place step).
    _grad: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.ptrs = tuple(map(DATA_PTR, self.params))

    @property
    def grad(self) -> Tensor:
        if self._grad is None:
            self._grad = register_flat(torch.zeros_like(self.param))
        return self._grad

    def grad_slot(self, i: int) -> Tensor:
        """A new view of param ``i``'s slot of the flat grad buffer (the chunk's own
        views are never handed out, so ``p.grad.data = t`` cannot move them)."""
        p = self.params[i]
        return self.grad.as_strided(p.shape, p.stride(), self.offsets[i])

    def holds_state(self, i: int, state: dict) -> bool:
        """Whether param ``i``'s state tensors are still the chunk's slots."""
        for role in self.roles:
            t = state.get(role)
            flat = self.state[role]
            if not isinstance(t, Tensor) or t.data_ptr() != flat.data_ptr() + self.offsets[i] * flat.element_size():
                return False
        return True

    def in_place(self) -> bool:
        """Whether every param still lives in its slot."""
        return tuple(map(DATA_PTR, self.params)) == self.ptrs


class Combiner:
    """The chunks of one optimizer, and which params it combined."""

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        #: Params that were combined and moved out since: they stay the user's.
        self._departed: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def combined(self, p: Tensor) -> bool:
        """Whether ``p`` is combined by this optimizer and still in its slot."""
        return _combined_by.get(p) is self and p not in self._departed

    def note_moves(self, params: Sequence[Tensor], expected: dict[int, int]) -> None:
        """Mark combined params whose data pointer left ``expected`` as departed."""
        for p in params:
            want = expected.get(id(p))
            if want is not None and p.data_ptr() != want:
                self._departed[p] = True

    def slot_ptrs(self) -> dict[int, int]:
        return {id(p): ptr for c in self.chunks for p, ptr in zip(c.params, c.ptrs)}

    def eligible(self, p: Tensor, overlapping: set[int]) -> bool:
        return (
            p not in _combined_by
            and p.numel() > 0
            and p.grad is not None
            and p.grad.dtype == p.dtype
            and p.layout == torch.strided
            and not p.is_shared()
            and id(p) not in overlapping
            and not is_foreign(p)
            and is_non_overlapping_and_dense(p)
        )

    def adopt(self, states: dict) -> None:
        """After ``load_state_dict`` (whose loaded tensors replaced the chunks' views):
        copy each combined param's loaded state into its slots and point the state back
        at them, so the chunks stay whole."""
        with torch.no_grad():
            for chunk in self.chunks:
                for i, p in enumerate(chunk.params):
                    st = states.get(p)
                    if not isinstance(st, dict) or not self.combined(p):
                        continue
                    for role in chunk.roles:
                        value = st.get(role)
                        if isinstance(value, Tensor) and value.shape == p.shape:
                            slot = _piece(chunk.state[role], chunk.offsets[i], p)
                            slot.copy_(value)
                            st[role] = slot
                    step = st.get("step")
                    if isinstance(step, Tensor) and step.numel() == 1:
                        chunk.steps[i] = step.reshape(())
                        st["step"] = chunk.steps[i]

    def combine(self, params: Sequence[Tensor], states: dict, roles: tuple[str, ...]) -> list[Chunk]:
        """Move ``params`` (one device and dtype, each eligible, with its state created)
        into new chunks; returns them."""
        if not params:
            return []
        first = params[0]
        total = sum(p.numel() for p in params)

        def new_flat() -> Tensor:
            return register_flat(torch.empty(total, dtype=first.dtype, device=first.device))

        flat_param = new_flat()
        flat_state = {role: new_flat() for role in roles}
        step_dtype = states[first]["step"].dtype
        steps = register_flat(torch.empty(len(params), dtype=step_dtype, device=states[first]["step"].device))
        offsets, offset = [], 0
        with torch.no_grad():
            for i, p in enumerate(params):
                st = states[p]
                view = _piece(flat_param, offset, p)
                view.copy_(p)
                p.data = view
                for role in roles:
                    sview = _piece(flat_state[role], offset, p)
                    sview.copy_(st[role])
                    st[role] = sview
                steps[i] = st["step"]
                st["step"] = steps[i]
                offsets.append(offset)
                offset += p.numel()
        chunk = Chunk(list(params), roles, flat_param, flat_state, steps, offsets)
        for p in params:
            _combined_by[p] = self
        self.chunks.append(chunk)
        return [chunk]
