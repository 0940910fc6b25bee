"""Fixtures: isolated NPU detection, a fake torchair, and the shared torch_npu wheel cache."""

from __future__ import annotations

import sys

import pytest
import torch
from npu_fakes import AUTOLOAD, FakeFinder, fake_torch_npu_ok, fake_torchair_body

from npu_optim_compile import _npu
import ge_allowlist


@pytest.fixture
def npu_env(monkeypatch):
    """Isolate npu detection: no cached status, no torch_npu/torchair/torch.npu, env restored."""
    for name in ("torch_npu", "torchair"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    # None reads as "no torch.npu"; teardown removes whatever a fake torch_npu put there.
    monkeypatch.setattr(torch, "npu", None, raising=False)
    monkeypatch.delenv(AUTOLOAD, raising=False)
    saved_meta_path = list(sys.meta_path)
    _npu.npu_status.cache_clear()

    def install(name: str, body: Callable[[types.ModuleType], None] | None) -> FakeFinder:
        finder = FakeFinder(name, body)
        sys.meta_path.insert(0, finder)
        return finder

    yield install
    sys.meta_path[:] = saved_meta_path
    for name in ("torch_npu", "torchair"):
        sys.modules.pop(name, None)
    _npu.npu_status.cache_clear()


@pytest.fixture
def fake_torchair(npu_env):
    """torch_npu imports (one device) and torchair is the duck-typed fake; yields the call log."""
    calls: list = []
    npu_env("torch_npu", fake_torch_npu_ok(1))
    npu_env("torchair", fake_torchair_body(calls))
    yield calls


@pytest.fixture(scope="session")
def torch_npu_wheel():
    """The real torch_npu wheel (cached under ~/.cache/npu_optim_compile), or skip."""
    try:
        return ge_allowlist.fetch_torch_npu_wheel()
    except ge_allowlist.WheelUnavailableError as e:
        pytest.skip(f"torch_npu {ge_allowlist.TORCH_NPU_VERSION} wheel not available offline: {e}")
