"""Fixtures for every test: the ``device`` parametrization (``tests/support/devices.py``)."""

from __future__ import annotations

import pytest
from devices import DEVICES, NO_CUDA, cuda_available


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """``"cpu"``, and ``"cuda"`` (marked ``cuda``; skipped where there is no GPU)."""
    return request.param


def pytest_collection_modifyitems(config, items):
    """Any test marked ``cuda`` (by the fixture or by hand) is skipped without a GPU."""
    if cuda_available():
        return
    skip = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
