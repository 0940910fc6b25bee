"""``optimizer.state`` that knows when it was changed.

The flat buffers hold the real state; ``optimizer.state[p][...]`` are views of them. If
code replaces or deletes a state entry (``opt.state[p]["momentum_buffer"] = zeros``,
``del opt.state[p]``, ``opt.state.clear()``), the optimizer must gather again from the
new tensors instead of updating the old buffers. Every such change bumps a counter,
so checking for it costs one comparison per step, whatever the number of params.
In-place changes of the tensors themselves need no tracking: they are the buffers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["TrackedState", "track"]


class _Entry(dict):
    """One param's state; assigning or removing a key bumps the owner's version."""

    def __init__(self, owner: TrackedState, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._owner = owner

    def _changed(self) -> None:
        self._owner.version += 1

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def clear(self):
        super().clear()
        self._changed()

    def pop(self, *args):
        value = super().pop(*args)
        self._changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._changed()
        return item

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def __reduce__(self):  # pickled as a plain dict; TrackedState wraps it again
        return (dict, (dict(self),))


class TrackedState(dict):
    """``defaultdict(dict)`` semantics (``state[p]`` creates an empty entry), with a
    ``version`` that changes whenever an entry or a key of an entry is replaced."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.version = 0
        for key, value in dict(*args, **kwargs).items():
            super().__setitem__(key, self._wrap(value))

    def _wrap(self, value: Any) -> Any:
        """A per-parameter dict becomes an _Entry; any other value (a hook may store an
        int or a bool under a string key, as torch.optim allows) is kept as it is."""
        if isinstance(value, _Entry) and value._owner is self:
            return value
        return _Entry(self, value) if isinstance(value, Mapping) else value

    def __missing__(self, key):
        entry = _Entry(self)
        super().__setitem__(key, entry)
        return entry

    def __setitem__(self, key, value):
        super().__setitem__(key, self._wrap(value))
        self.version += 1

    def __delitem__(self, key):
        super().__delitem__(key)
        self.version += 1

    def clear(self):
        super().clear()
        self.version += 1

    def pop(self, *args):
        value = super().pop(*args)
        self.version += 1
        return value

    def popitem(self):
        item = super().popitem()
        self.version += 1
        return item

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __reduce__(self):
        return (TrackedState, (dict(self),))


def track(state: dict) -> TrackedState:
    """``state`` as a TrackedState (itself if it already is one)."""
    return state if isinstance(state, TrackedState) else TrackedState(state)
