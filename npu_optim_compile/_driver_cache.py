"""The segment drivers' sources on disk, so that a new process skips the compile.

A warm first step used to cost 3.4-3.7 s whatever the model (measured at 200 and 1000
tensors, inductor's cache warm): Dynamo, AOT autograd and inductor's cache lookup
(about 2 s) and importing inductor (about 1.7 s), only to obtain the kernel source the
driver is built from; loading the driver itself takes 4 ms. So the driver's source is
kept in inductor's cache folder (``TORCHINDUCTOR_CACHE_DIR``: a fresh folder is a cold
start, as for inductor), and a later process loads it with ``CppCodeCache.load``.

The key holds everything the source depends on: the :class:`StepKey`, torch's version,
the vector ISA inductor picks now (``ATEN_CPU_CAPABILITY`` changes it; inductor's own
cache does not key on it), ``cpp.simdlen``, the C++ compiler, and the text of this
package's and its pass's Python files (the math and the driver template).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

__all__ = ["clear", "load", "store"]

_PACKAGE = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    h = hashlib.sha256()
    for folder in (_PACKAGE, _PACKAGE.parent / "passes"):
        for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _folder() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "npu_optim_compile_drivers"


def _path(key) -> Path:
    from torch._inductor import config
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    parts = (repr(key), torch.__version__, str(pick_vec_isa()), str(config.cpp.simdlen), str(config.cpp.cxx),
             os.environ.get("CXX", ""), _code_digest())
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
    return _folder() / f"{key.name()}-{digest}.cpp"


def load(key) -> str | None:
    """The driver source stored for ``key``, or None."""
    try:
        return _path(key).read_text()
    except OSError:
        return None


def store(key, source: str) -> None:
    """Keep ``source`` for ``key`` (written whole, then renamed: other processes read it)."""
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(source)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: the next process compiles again


def clear() -> None:
    """Forget every stored driver (``_bucket_step.clear_cache``)."""
    shutil.rmtree(_folder(), ignore_errors=True)
