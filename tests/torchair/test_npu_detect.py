"""npu_optim_compile._npu: detection without torch_npu, with a broken one, with a fake one."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from npu_fakes import AUTOLOAD, fake_torch_npu_ok

from npu_optim_compile import _npu

CANN_ERROR = "libhccl.so: cannot open shared object file: No such file or directory"


def broken_torch_npu(module: types.ModuleType) -> None:
    """Like the real torch_npu without CANN: sets the autoload switch to "0", then fails."""
    os.environ[AUTOLOAD] = "0"
    raise ImportError(CANN_ERROR)


def test_not_installed(npu_env):
    npu_env("torch_npu", None)
    status = _npu.npu_status()
    assert status == _npu.NpuStatus(
        available=False, reason="torch_npu is not installed (pip install 'npu-optim-compile[npu]')"
    )
    assert _npu.npu_available() is False


@pytest.mark.parametrize("original", [None, "1", "0"])
def test_import_failure_reason_and_env_restored(npu_env, monkeypatch, original):
    if original is not None:
        monkeypatch.setenv(AUTOLOAD, original)
    npu_env("torch_npu", broken_torch_npu)
    status = _npu.npu_status()
    assert not status.available
    assert status.reason == (
        f"import torch_npu failed: {CANN_ERROR} (the Ascend CANN libraries are missing?)"
    )
    assert status.torch_npu_version is None
    assert os.environ.get(AUTOLOAD) == original


def test_status_is_cached_until_cleared(npu_env):
    finder = npu_env("torch_npu", broken_torch_npu)
    first = _npu.npu_status()
    assert _npu.npu_status() is first
    assert _npu.npu_available() is False
    assert finder.imports == 1
    _npu.npu_status.cache_clear()
    _npu.npu_status()
    assert finder.imports == 2


def test_import_runtime_error_is_reported(npu_env):
    def conflict(module):
        raise RuntimeError("Two accelerators cannot be used at the same time in PyTorch: npu and cuda")

    npu_env("torch_npu", conflict)
    assert _npu.npu_status().reason == (
        "import torch_npu failed: RuntimeError: "
        "Two accelerators cannot be used at the same time in PyTorch: npu and cuda"
    )


def test_imported_but_no_device(npu_env):
    npu_env("torch_npu", fake_torch_npu_ok(device_count=0))
    status = _npu.npu_status()
    assert status == _npu.NpuStatus(False, "torch_npu imported but no NPU device is visible", "2.13.0")


def test_imported_without_torch_npu_attribute(npu_env):
    npu_env("torch_npu", lambda module: None)
    status = _npu.npu_status()
    assert not status.available
    assert "torch.npu is missing" in status.reason


def test_available(npu_env):
    npu_env("torch_npu", fake_torch_npu_ok(device_count=2))
    status = _npu.npu_status()
    assert status.available and _npu.npu_available()
    assert "2 NPU device(s)" in status.reason


def test_require_torchair_explains_missing_torch_npu(npu_env):
    npu_env("torch_npu", broken_torch_npu)
    with pytest.raises(RuntimeError) as info:
        _npu.require_torchair("NpuFusedRMSprop(backend='torchair')")
    message = str(info.value)
    assert message.startswith("NpuFusedRMSprop(backend='torchair') needs torchair")
    assert CANN_ERROR in message
    assert "npu-optim-compile[npu]" in message
    assert "torchair" not in sys.modules


def test_require_torchair_returns_module_without_a_device(npu_env):
    npu_env("torch_npu", fake_torch_npu_ok(device_count=0))
    npu_env("torchair", lambda m: setattr(m, "CompilerConfig", object) or setattr(m, "get_npu_backend", id))
    torchair = _npu.require_torchair("x")
    assert torchair is sys.modules["torchair"]
    assert torchair.CompilerConfig is object


def test_require_torchair_reports_broken_torchair(npu_env):
    def broken(module):
        raise OSError("libge_runner.so: cannot open shared object file")

    npu_env("torch_npu", fake_torch_npu_ok(device_count=1))
    npu_env("torchair", broken)
    with pytest.raises(RuntimeError, match=r"import torchair` failed: OSError: libge_runner\.so"):
        _npu.require_torchair("make_torchair_backend")


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        ("npu", True),
        ("npu:3", True),
        ("cpu", False),
        ("cuda:0", False),
        (torch.device("cpu"), False),
        (torch.zeros(1), False),
        (types.SimpleNamespace(type="npu", index=0), True),
        (types.SimpleNamespace(device=types.SimpleNamespace(type="npu")), True),
        (None, False),
    ],
)
def test_is_npu_device(device, expected):
    assert _npu.is_npu_device(device) is expected


def test_package_import_never_imports_torch_npu_or_torchair(tmp_path):
    """A fake torch_npu and torchair are importable, yet importing our package loads neither."""
    for name in ("torch_npu", "torchair"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    code = textwrap.dedent(
        """
        import importlib, importlib.util, pkgutil, sys
        assert importlib.util.find_spec("torch_npu") is not None  # the bait is reachable
        import npu_optim_compile
        assert "npu_optim_compile._dry_run" not in sys.modules  # ascend_dry_run loads on use
        assert npu_optim_compile.ascend_dry_run.__module__ == "npu_optim_compile._dry_run"
        for info in pkgutil.walk_packages(npu_optim_compile.__path__, "npu_optim_compile."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
        import npu_optim_compile._npu, npu_optim_compile._torchair_backend
        import npu_optim_compile.passes.ge_ops
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch_npu", "torchair")))
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
