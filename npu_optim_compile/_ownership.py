"""Whose storage a tensor lives in: what the optimizer may re-point, and what it must not.

By default the optimizer re-points nothing. With ``combine_params=True``
(``_combined.py``) it re-points ``p.data`` and the state tensors into buffers it
allocates, and ``zero_grad(set_to_none=False)`` points grads into them. That is only
safe for a tensor whose storage nobody else lays out. Three engines own storage
themselves:

- ``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)`` makes every param a view
  of *its* per-rank bucket and broadcasts that bucket after each step: a param
  re-pointed into our buffer would no longer receive (or send) the broadcast.
- ``DistributedDataParallel(gradient_as_bucket_view=True)`` makes every grad a view of
  DDP's all-reduce bucket and points it back there in each backward.
- FSDP2 (``fully_shard``) holds params and grads as DTensors whose local shards are
  views of FSDP's padded shard buffers.

So: a tensor that shares its storage with other tensors, in a storage the optimizer did
not allocate (a view into a larger storage, or a storage another tensor also uses), is
*foreign*. A foreign param is never combined: it is updated in place, where it lives. A
foreign grad is never re-pointed either: it is read where it lives. Tensor subclasses
such as DTensor are updated through their local tensors (:func:`local_tensors`); their
state stays a DTensor, like torch.optim.RMSprop's, so distributed checkpoints work.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

__all__ = ["is_foreign", "local_tensors", "register_flat", "storage_key"]

#: The storages of the flat buffers the optimizers of this process allocated. A storage's
#: Python object lives as long as any tensor uses it, so a flat buffer stays known while
#: any view of it does, even after the bucket that allocated it is gone.
_flat_storages: weakref.WeakSet[torch.UntypedStorage] = weakref.WeakSet()


def register_flat(flat: Tensor) -> Tensor:
    """Record ``flat`` as one of our flat buffers; return it."""
    _flat_storages.add(flat.untyped_storage())
    return flat


def is_foreign(t: Tensor) -> bool:
    """Whether the optimizer must not re-point ``t``: a tensor subclass (DTensor), or a
    tensor whose storage, not one of our flat buffers, other tensors share."""
    if is_traceable_wrapper_subclass(t):
        return True
    if t.layout != torch.strided:
        return False
    storage = t.untyped_storage()
    if storage in _flat_storages:
        return False
    if storage.nbytes() > t.numel() * t.element_size():
        return True
    # t spans all of its storage; another tensor may still share it (a ZeRO bucket that
    # holds a single param). Alone, the storage is held by t and by `storage` here: 2.
    return _storage_use_count(storage) > 2


def _storage_use_count(storage: torch.UntypedStorage) -> int:
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return use_count(storage._cdata) if use_count is not None else 0


def storage_key(t: Tensor) -> int | tuple:
    """``t.data_ptr()``, also for tensor subclasses (the keys of their inner tensors),
    which have no storage of their own."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = (getattr(t, name) for name in names)
        return tuple(storage_key(x) for x in inner if isinstance(x, Tensor))
    return t.data_ptr()


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor  # imported on first use only

    return DTensor


def local_tensors(tensors: Iterable[Tensor], like: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Each DTensor as its local tensor (the storage its owner updates in place); other
    tensors as they are.

    With ``like`` (the params), a DTensor whose placements differ from its param's (a
    ``Partial`` grad, say) is redistributed to the param's placements first, so the
    local tensors line up element by element.
    """
    tensors = list(tensors)
    if not any(is_traceable_wrapper_subclass(t) for t in tensors):
        return tensors
    dtensor = _dtensor_type()
    out = []
    for i, t in enumerate(tensors):
        if dtensor is not None and isinstance(t, dtensor):
            ref = like[i] if like is not None else None
            if isinstance(ref, dtensor) and (t.placements != ref.placements or t.device_mesh != ref.device_mesh):
                t = t.redistribute(ref.device_mesh, ref.placements)
            t = t._local_tensor  # what to_local() returns under no_grad, without a view op
        out.append(t)
    return out
