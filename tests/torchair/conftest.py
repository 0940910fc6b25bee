"""Fixtures: isolated NPU detection, a fake torchair, the shared torch_npu wheel cache,
torchair's real code under ascend_dry_run(), and the table of GE graphs the dry-run tests
print at the end of the run."""

from __future__ import annotations

import sys

import pytest
import torch
from npu_fakes import AUTOLOAD, FakeFinder, fake_torch_npu_ok, fake_torchair_body

from npu_optim_compile import _npu
import ge_allowlist
from npu_optim_compile import ascend_dry_run

#: (structure, dtype) -> (GE nodes, Cast nodes, op counts), filled by the dry-run tests.
GE_TABLE = pytest.StashKey[dict]()


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


@pytest.fixture(scope="module")
def dry_run(torch_npu_wheel, tmp_path_factory):
    """One ascend_dry_run() for a whole test module (entering imports torchair, which
    takes seconds); yields it: ``.graphs`` (the GE graph records), ``.dump_dir``,
    ``.torchair``."""
    context = ascend_dry_run(torch_npu_wheel, dump_dir=tmp_path_factory.mktemp("ge_dumps"))
    with context:
        yield context


@pytest.fixture
def ge_table(request) -> dict:
    return request.config.stash.setdefault(GE_TABLE, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    table = config.stash.get(GE_TABLE, {})
    if not table:
        return
    terminalreporter.write_sep("-", "bucket-step GE graphs under ascend_dry_run (torch_npu 2.13.0's torchair)")
    for (structure, dtype), (nodes, casts, ops) in sorted(table.items()):
        terminalreporter.write_line(f"{structure or '(default)'} [{dtype}]: {nodes} nodes, {casts} Cast ({ops})")
