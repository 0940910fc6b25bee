"""Safe detection of Ascend NPU support (torch_npu + torchair).

Nothing here imports ``torch_npu`` or ``torchair`` at module import time. Installing
torch_npu without the Ascend CANN libraries breaks ``import torch_npu`` (ImportError
``libhccl.so``), and a failed import leaves ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` in the
environment, which every subprocess would inherit. :func:`npu_status` tries the import
once, restores that variable, and caches the answer for the process.

torchair is not a top-level package of its own: ``import torch_npu`` installs a lazy
``sys.modules["torchair"]`` proxy for ``torch_npu/dynamo/torchair``. So torchair is only
importable after torch_npu imported successfully; :func:`require_torchair` checks this.

Inside ``ascend_dry_run()`` (``_dry_run.py``) torchair's own code is importable without
torch_npu; :func:`npu_status` then reports the dry run, and :func:`is_npu_device` treats
the CPU as the NPU.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

__all__ = ["NpuStatus", "npu_status", "npu_available", "is_npu_device", "require_torchair"]

_AUTOLOAD_VAR = "TORCH_DEVICE_BACKEND_AUTOLOAD"
_INSTALL_HINT = "pip install 'npu-optim-compile[npu]'"


@dataclasses.dataclass(frozen=True)
class NpuStatus:
    """What this process can do with Ascend NPUs.

    Attributes:
        available: True when torch_npu imported and at least one NPU device is visible.
        reason: a sentence saying what was found or exactly what is missing.
        torch_npu_version: the version of torch_npu when it imported successfully
            (even if no device is visible), else None. torchair is usable iff this is set.
    """

    available: bool
    reason: str
    torch_npu_version: str | None = None


def _restore_env(name: str, saved: str | None) -> None:
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved


def _torch_npu_installed() -> bool:
    if sys.modules.get("torch_npu") is not None:
        return True
    try:
        return importlib.util.find_spec("torch_npu") is not None
    except (ImportError, ValueError):
        return False


def _import_torch_npu() -> ModuleType:
    """Import torch_npu, undoing its change to TORCH_DEVICE_BACKEND_AUTOLOAD."""
    saved = os.environ.get(_AUTOLOAD_VAR)
    try:
        return importlib.import_module("torch_npu")
    finally:
        _restore_env(_AUTOLOAD_VAR, saved)


def _probe() -> NpuStatus:
    if not _torch_npu_installed():
        return NpuStatus(False, f"torch_npu is not installed ({_INSTALL_HINT})")
    try:
        torch_npu = _import_torch_npu()
    except (ImportError, OSError) as e:
        return NpuStatus(
            False, f"import torch_npu failed: {e} (the Ascend CANN libraries are missing?)"
        )
    except Exception as e:  # noqa: BLE001 - e.g. RuntimeError "Two accelerators ..."
        return NpuStatus(False, f"import torch_npu failed: {type(e).__name__}: {e}")
    version = str(getattr(torch_npu, "__version__", "unknown"))

    import torch

    npu = getattr(torch, "npu", None)
    if npu is None:
        return NpuStatus(False, f"torch_npu {version} imported but torch.npu is missing", version)
    try:
        count = int(npu.device_count()) if npu.is_available() else 0
    except Exception as e:  # noqa: BLE001 - a driver error must not escape detection
        return NpuStatus(
            False,
            f"torch_npu {version} imported but querying NPU devices failed: "
            f"{type(e).__name__}: {e}",
            version,
        )
    if count == 0:
        return NpuStatus(False, "torch_npu imported but no NPU device is visible", version)
    return NpuStatus(True, f"torch_npu {version}: {count} NPU device(s) visible", version)


#: Set while ``ascend_dry_run()`` is active (``_dry_run.py``): the status it reports.
_dry_run_status: NpuStatus | None = None


def set_dry_run_status(status: NpuStatus | None) -> None:
    """Called by ``ascend_dry_run()`` on entry (its status) and exit (None)."""
    global _dry_run_status
    _dry_run_status = status


_probe_once = functools.cache(_probe)


def npu_status() -> NpuStatus:
    """Detect torch_npu and NPU devices once per process (cached; ``npu_status.cache_clear()``).

    The first call may import torch_npu (never at module import time). It restores
    ``TORCH_DEVICE_BACKEND_AUTOLOAD`` to its previous value (or unsets it) afterwards.
    Inside ``ascend_dry_run()`` it reports the dry run's status (available, no probe).
    """
    return _dry_run_status if _dry_run_status is not None else _probe_once()


npu_status.cache_clear = _probe_once.cache_clear  # type: ignore[attr-defined]


def npu_available() -> bool:
    """True when torch_npu imported and an NPU device is visible (see :func:`npu_status`)."""
    return npu_status().available


def is_npu_device(device: Any) -> bool:
    """True when the library treats ``device`` as an Ascend NPU: an ``npu`` device, or,
    inside ``ascend_dry_run()``, the CPU (whose tensors stand in for NPU tensors). The
    library's NPU decisions go through it (``backend="auto"`` resolving to torchair, float32
    hyperparameters). Imports nothing.

    Accepts a ``torch.device``, a tensor (its ``.device``), a string such as ``"npu:0"``,
    or None (False). Without torch_npu, ``torch.device("npu")`` itself fails, hence the
    string handling.
    """
    if device is None:
        return False
    if isinstance(device, str):
        kind = device.split(":", 1)[0].strip()
    else:
        kind = getattr(getattr(device, "device", device), "type", None)  # a tensor's device
    return kind == "npu" or (kind == "cpu" and _dry_run_status is not None)


def require_torchair(what: str) -> ModuleType:
    """Import and return torchair, or raise RuntimeError naming what is missing for ``what``.

    torchair needs torch_npu to import (it lives inside the torch_npu wheel); a visible
    NPU device is not required to build a backend.
    """
    status = npu_status()
    if status.torch_npu_version is None:
        hint = "" if _INSTALL_HINT in status.reason else f" ({_INSTALL_HINT})"  # said once
        raise RuntimeError(
            f"{what} needs torchair, which ships inside torch_npu, but {status.reason}. "
            f"Install torch_npu with the Ascend CANN toolkit{hint} and source "
            f"CANN's set_env.sh, or use an inductor backend instead."
        )
    try:
        torchair = importlib.import_module("torchair")
        # torch_npu's lazy proxy defers import errors to the first attribute access.
        torchair.CompilerConfig  # noqa: B018
        torchair.get_npu_backend  # noqa: B018
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError, OSError (libge_runner.so)
        raise RuntimeError(
            f"{what} needs torchair, but torch_npu {status.torch_npu_version} imported and "
            f"`import torchair` failed: {type(e).__name__}: {e}. torchair needs the CANN "
            f"Graph Engine libraries (libge_runner.so) plus the `packaging` and `protobuf` "
            f"packages."
        ) from e
    return torchair
