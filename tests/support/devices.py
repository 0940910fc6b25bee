"""The devices a test runs on: the CPU always, CUDA when torch sees a GPU.

Use the ``device`` fixture (``tests/conftest.py``), or ``DEVICES`` in a
``pytest.mark.parametrize``. The CUDA variants carry the ``cuda`` mark, so
``python -m pytest -m cuda`` selects them (``tools/gpu_check.sh`` runs them on a GPU);
where ``torch.cuda.is_available()`` is False they are collected and skipped, with the
reason.
"""

from __future__ import annotations

import pytest
import torch

NO_CUDA = "CUDA is not available (torch.cuda.is_available() is False)"


def cuda_available() -> bool:
    return torch.cuda.is_available()


#: The device parametrization: ``"cpu"``, and ``"cuda"`` marked ``cuda`` (tests/conftest.py
#: skips every test so marked where there is no GPU).
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


def synchronize(device: str | torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
