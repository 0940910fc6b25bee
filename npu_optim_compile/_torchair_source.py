"""Where torchair's Python sources come from on a machine without an NPU.

torchair is not a package of its own: it ships inside the torch_npu wheel as
``torch_npu/dynamo/torchair/`` (pure Python, plus four C extensions that need CANN) and
imports itself as top-level ``torchair``. :func:`locate_torchair` finds a folder holding
``torchair/`` (and ``npugraph_ex/``, which torchair imports in places) without importing
torch_npu, in this order:

1. ``source`` (a keyword) or the environment variable :data:`SOURCE_ENV`: a torch_npu
   wheel, an installed or unpacked ``torch_npu`` package folder, a folder that holds
   ``torchair/`` itself, or a folder that holds a torch_npu wheel;
2. an installed torch_npu (``importlib.util.find_spec``, which runs none of its code);
3. the torch_npu wheel in the cache folder (:func:`default_cache_dir`), downloaded once with
   ``pip download --no-deps`` (:func:`fetch_torch_npu_wheel`).

A wheel is never installed (torch_npu without CANN breaks ``import torch``): only its
``torch_npu/dynamo/{torchair,npugraph_ex}/`` Python files are extracted, next to the
wheel, into ``torchair-<wheel name>/``. Its ``dist-info`` is never unpacked onto
``sys.path``, where torch's device-backend autoload would load it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "SOURCE_ENV",
    "TORCH_NPU_VERSION",
    "TorchairSource",
    "WheelUnavailableError",
    "default_cache_dir",
    "fetch_torch_npu_wheel",
    "locate_torchair",
]

#: The torch_npu release whose torchair the library is written against.
TORCH_NPU_VERSION = "2.13.0"
#: Names a torch_npu wheel or folder to take torchair from (for offline use).
SOURCE_ENV = "NPU_OPTIM_COMPILE_TORCH_NPU"

_DYNAMO = "torch_npu/dynamo/"
_PACKAGES = ("torchair", "npugraph_ex")
# Any platform's wheel holds the same Python sources; this one is the reference.
_PIP_PLATFORM_ARGS = (
    "--only-binary=:all:", "--python-version", "3.11",
    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
    "--platform", "manylinux_2_17_x86_64",
)  # fmt: skip


class WheelUnavailableError(RuntimeError):
    """The torch_npu wheel is neither given, cached nor downloadable (offline, no PyPI)."""


@dataclass(frozen=True)
class TorchairSource:
    """A folder whose ``torchair/`` is torchair's package, and where it came from."""

    folder: Path
    origin: str  # "installed torch_npu at ...", "wheel ...", "folder ..."
    torch_npu_version: str | None


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/npu_optim_compile`` (default ``~/.cache/npu_optim_compile``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "npu_optim_compile"


def fetch_torch_npu_wheel(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    version: str = TORCH_NPU_VERSION,
    timeout_s: float = 600,
    hint: str = "pass --wheel PATH",
) -> Path:
    """Return a cached ``torch_npu-<version>-*.whl``, downloading it once with pip.

    Only ``pip download --no-deps`` is used, never ``pip install``. Any wheel already in
    ``cache_dir`` is reused (drop one there to work offline). Raises
    :class:`WheelUnavailableError` with pip's output (and ``hint``) when it fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = sorted(cache.glob(f"torch_npu-{version}-*.whl"))
    if cached:
        return cached[0]
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--retries", "1", "--timeout", "20", *_PIP_PLATFORM_ARGS,
               "-d", tmp, f"torch_npu=={version}"]  # fmt: skip
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise WheelUnavailableError(f"pip download torch_npu=={version} failed: {e}") from e
        wheels = sorted(Path(tmp).glob(f"torch_npu-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            lines = (proc.stdout + proc.stderr).strip().splitlines()
            tail = [line for line in lines if line.startswith("ERROR")] or lines[-3:]
            raise WheelUnavailableError(
                f"pip download torch_npu=={version} failed (exit {proc.returncode}): "
                + " | ".join(tail)
                + f". Put the wheel into {cache} or {hint}."
            )
        target = cache / wheels[0].name
        os.replace(wheels[0], target)  # atomic: concurrent runs never see half a file
    return target


def _version_of(version_py: Path) -> str | None:
    try:
        text = version_py.read_text(encoding="utf-8")
    except OSError:
        return None
    found = re.search(r"^__version__\s*=\s*'([^']*)'", text, re.M)
    return found.group(1) if found else None


def _extract(wheel: Path) -> TorchairSource:
    """The wheel's torchair and npugraph_ex Python files, extracted once beside it."""
    target = wheel.with_name(f"torchair-{wheel.stem}")
    if not (target / "torchair" / "__init__.py").is_file():
        try:
            with zipfile.ZipFile(wheel) as zf:
                names = [
                    n for n in zf.namelist()
                    if n.startswith(tuple(_DYNAMO + p + "/" for p in _PACKAGES)) and not n.endswith((".so", "/"))
                ]  # fmt: skip
                if not any(n == _DYNAMO + "torchair/__init__.py" for n in names):
                    raise WheelUnavailableError(f"{wheel} holds no {_DYNAMO}torchair/: not a torch_npu wheel?")
                version_py = zf.read("torch_npu/version.py") if "torch_npu/version.py" in zf.namelist() else b""
                with tempfile.TemporaryDirectory(dir=wheel.parent, prefix=".extract-") as tmp:
                    for name in names:
                        dest = Path(tmp, name[len(_DYNAMO) :])
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        dest.write_bytes(zf.read(name))
                    Path(tmp, "version.py").write_bytes(version_py)
                    try:
                        os.replace(tmp, target)  # atomic; the loser of a race keeps the winner's
                    except OSError:
                        if not (target / "torchair" / "__init__.py").is_file():
                            raise
                    os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory removes it again
        except (OSError, zipfile.BadZipFile) as e:
            raise WheelUnavailableError(f"cannot read torchair from {wheel}: {e}") from e
    return TorchairSource(target, f"wheel {wheel}", _version_of(target / "version.py"))


def _from_path(path: Path) -> TorchairSource:
    if path.is_file():
        return _extract(path)
    if (path / "torchair" / "__init__.py").is_file():  # e.g. <torch_npu>/dynamo
        return TorchairSource(path, f"folder {path}", _version_of(path.parent / "version.py"))
    if (path / "dynamo" / "torchair" / "__init__.py").is_file():  # a torch_npu package folder
        return TorchairSource(path / "dynamo", f"torch_npu folder {path}", _version_of(path / "version.py"))
    wheels = sorted(path.glob("torch_npu-*.whl")) if path.is_dir() else []
    if wheels:
        return _extract(wheels[-1])
    raise WheelUnavailableError(
        f"{path} is neither a torch_npu wheel nor a folder holding torchair/, dynamo/torchair/ or a torch_npu wheel"
    )


def locate_torchair(
    source: str | os.PathLike[str] | None = None, *, cache_dir: str | os.PathLike[str] | None = None
) -> TorchairSource:
    """Find torchair's sources (module docstring); may download the wheel once.

    Raises:
        WheelUnavailableError: nothing found and the download failed (offline); the
            message says how to point at a wheel instead.
    """
    given = source if source is not None else os.environ.get(SOURCE_ENV) or None
    if given is not None:
        return _from_path(Path(given).expanduser())
    try:
        spec = importlib.util.find_spec("torch_npu")  # finds it, runs none of its code
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(location) / "dynamo" / "torchair" / "__init__.py").is_file():
            found = _from_path(Path(location))
            return TorchairSource(found.folder, f"installed torch_npu at {location}", found.torch_npu_version)
    hint = f"pass ascend_dry_run(torch_npu=PATH) or set {SOURCE_ENV}=PATH (a wheel or a folder)"
    return _extract(fetch_torch_npu_wheel(cache_dir, hint=hint))

