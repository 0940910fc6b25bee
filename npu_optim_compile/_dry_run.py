"""``ascend_dry_run()``: torchair's real Python code on a machine without an NPU.

::

    with npu_optim_compile.ascend_dry_run() as graphs:
        opt = NpuFusedRMSprop(model.parameters(), backend="torchair")
        ...                                  # CPU tensors stand in for NPU tensors
    for g in graphs:
        print(g.summary())                   # one record per GE graph

Inside the context:

- ``import torchair`` gives torchair's own Python sources (from an installed torch_npu,
  never imported, or from the torch_npu wheel, downloaded once; see
  ``_torchair_source.py``). Only its four C extensions are replaced, by the stand-ins of
  ``_ge_standins.py``: torchair's FX-to-GE converters, its GE graph passes and its dumps
  run for real, and GE's ``run`` evaluates the GE graph itself (``_ge_eval.py``).
  ``import torch_npu`` fails, as on a machine without CANN, so torchair takes its
  no-torch_npu branches.
- The library treats the CPU as the NPU (:func:`npu_optim_compile._npu.is_npu_device`):
  ``backend="auto"`` resolves to torchair, ``backend="torchair"`` is accepted, and NPU
  buckets' device decisions apply (float32 hyperparameters).

Leaving the context restores what it and torchair changed in the process
(``_dry_run_state.py`` lists it: ``sys.modules``, signal handlers, ``atexit``, logging,
converters on torch's ops, ``torch.library`` fragments, decompositions and Python kernels
torchair patches), ``sys.meta_path``, Dynamo's skip rule for torchair's folder
(:meth:`AscendDryRun._skip_in_dynamo`), and the library's compiled bucket steps (they
were compiled through the stand-ins).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any

import torch

from . import _npu
from ._dry_run_state import SERVED, ProcessState
from ._ge_standins import GeGraphRecord, standin_modules
from ._torchair_source import TorchairSource, locate_torchair

__all__ = ["ascend_dry_run", "AscendDryRun", "DryRunError", "run_script"]

_lock = threading.Lock()
_active: AscendDryRun | None = None


class DryRunError(RuntimeError):
    """The dry run cannot start here (the message says why and what to do)."""


class _TorchairFinder(importlib.abc.MetaPathFinder):
    """Serves ``torchair`` and ``npugraph_ex`` from one folder; hides ``torch_npu``."""

    def __init__(self, folder: Path) -> None:
        self.folder = str(folder)

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top == "torch_npu":
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (hidden by ascend_dry_run: no NPU here)", name=fullname
            )
        if fullname in SERVED:
            return importlib.machinery.PathFinder.find_spec(fullname, [self.folder])
        return None


class AscendDryRun:
    """The context manager behind :func:`ascend_dry_run` (one per ``with``)."""

    def __init__(
        self,
        torch_npu: str | os.PathLike[str] | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        dump_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._source_arg, self._cache_dir = torch_npu, cache_dir
        self.dump_dir = None if dump_dir is None else os.fspath(dump_dir)
        self.graphs: list[GeGraphRecord] = []
        self.source: TorchairSource | None = None
        self.torchair: types.ModuleType | None = None

    # -- entering ---------------------------------------------------------------------

    def __enter__(self) -> list[GeGraphRecord]:
        global _active
        with _lock:
            if _active is not None:
                raise DryRunError("ascend_dry_run() is already active in this process (it does not nest)")
            self._check_process()
            self.source = locate_torchair(self._source_arg, cache_dir=self._cache_dir)
            _active = self
        try:
            self._install()
        except BaseException:
            self._restore()
            raise
        return self.graphs

    @staticmethod
    def _check_process() -> None:
        if sys.modules.get("torch_npu") is not None:
            raise DryRunError(
                "ascend_dry_run() stands in for torchair's C extensions, but torch_npu is imported in this "
                "process: on an NPU machine run the real thing (backend='torchair'), without the dry run"
            )
        missing = [m for m in ("google.protobuf", "yaml") if importlib.util.find_spec(m) is None]
        if missing:
            packages = {"google.protobuf": "protobuf", "yaml": "pyyaml"}
            raise DryRunError(
                f"torchair needs {', '.join(packages[m] for m in missing)}: "
                f"pip install {' '.join(packages[m] for m in missing)} (or \"npu-optim-compile[dryrun]\")"
            )
        if hasattr(torch.ops.aten.add.Tensor, "_ge_converter"):
            raise DryRunError("torchair's converters are already loaded in this process (another torchair import)")

    def _install(self) -> None:
        self._state = ProcessState()
        for name in self._state.modules:
            del sys.modules[name]
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
        self._finder = _TorchairFinder(self.source.folder)
        sys.meta_path.insert(0, self._finder)
        sys.modules.update(standin_modules(self.graphs, self.dump_dir))
        self.torchair = importlib.import_module("torchair")
        with warnings.catch_warnings():
            # Its converters of torch_npu's own ops (torch.ops.npu.*) fail to import without
            # torch_npu, each with a warning; torchair imports them on its first lookup of an
            # op it has no converter for.
            warnings.filterwarnings("ignore", "Failed to import torchair._ge_concrete_graph.ge_converter.custom")
            importlib.import_module("torchair._ge_concrete_graph.ge_converter.custom")
        self._skip_in_dynamo()
        _npu.set_dry_run_status(
            _npu.NpuStatus(
                True,
                f"ascend_dry_run: torchair from {self.source.origin}, CPU tensors stand in for the NPU",
                self.source.torch_npu_version or "unknown",
            )
        )

    def _skip_in_dynamo(self) -> None:
        """Keep Dynamo out of torchair's own code, as on an NPU.

        There autograd runs a backward on the device's thread, outside the frame hook of a
        user's ``torch.compile``; AOT compiles the backward graph (through torchair) and GE
        runs it there. With CPU tensors it all runs on the calling thread, and Dynamo would
        trace torchair's compiler. (The stand-ins are ``torch._dynamo.disable``d.) Dynamo's
        rule for files it does not trace is ``trace_rules.SKIP_DIRS`` (torch 2.13).
        """
        from torch._dynamo import trace_rules

        self._skip_dirs = [
            trace_rules._as_posix_path(str(self.source.folder / name)) + "/"
            for name in SERVED
            if (self.source.folder / name).is_dir()
        ]
        trace_rules.SKIP_DIRS.extend(self._skip_dirs)
        trace_rules._recompile_re()

    def _unskip_in_dynamo(self) -> None:
        from torch._dynamo import trace_rules

        for d in getattr(self, "_skip_dirs", ()):
            if d in trace_rules.SKIP_DIRS:
                trace_rules.SKIP_DIRS.remove(d)
        trace_rules._recompile_re()

    # -- leaving ------------------------------------------------------------------------

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        global _active
        _npu.set_dry_run_status(None)
        try:
            from . import _bucket_step

            _bucket_step.clear_cache()  # their graphs run through the stand-ins
            self._unskip_in_dynamo()
        finally:
            if getattr(self, "_finder", None) in sys.meta_path:
                sys.meta_path.remove(self._finder)
                folder = str(self._finder.folder)
                for key in [k for k in sys.path_importer_cache if str(k).startswith(folder)]:
                    del sys.path_importer_cache[key]
            if hasattr(self, "_state"):
                self._state.restore()
            importlib.invalidate_caches()
            _active = None


def ascend_dry_run(
    torch_npu: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
) -> AscendDryRun:
    """Run torchair's real FX-to-GE conversion on this machine, without an NPU.

    ``with ascend_dry_run() as graphs:`` makes ``import torchair`` load torchair's own
    Python code with its C extensions replaced by stand-ins, and makes the library treat
    CPU tensors as NPU tensors (``backend="auto"`` and ``"torchair"`` compile through
    torchair, hyperparameters in float32 as on an NPU). Each GE graph that torchair
    hands to GE is appended to ``graphs`` (:class:`~npu_optim_compile._ge_standins.GeGraphRecord`:
    its GraphDef, node and Cast counts); running it evaluates the GE graph itself, op by
    op, with an interpreter written from CANN's operator definitions
    (``npu_optim_compile/_ge_eval.py``), which raises on an op it does not know.

    Args:
        torch_npu: a torch_npu wheel, or a folder (a torch_npu package, a folder holding
            ``torchair/``, or one holding the wheel). Default: the environment variable
            ``NPU_OPTIM_COMPILE_TORCH_NPU``, else an installed torch_npu (never imported),
            else the torch_npu 2.13.0 wheel, downloaded once with ``pip download --no-deps``
            into ``cache_dir``. torch_npu is never installed.
        cache_dir: where the wheel is kept (default ``~/.cache/npu_optim_compile``).
        dump_dir: when set, every GE graph GE receives is also written there as
            ``ge_NNN_<graph>.pbtxt``.

    What it checks and what only an NPU can: README, section "Ascend NPUs", "The dry run".
    Leaving the context restores every global it changed (``_dry_run.py``).

    Raises:
        DryRunError: already active, torch_npu imported (an NPU machine), or torchair's
            dependencies (protobuf, pyyaml) missing.
        npu_optim_compile._torchair_source.WheelUnavailableError: no torchair found and
            the wheel cannot be downloaded (offline); says how to point at one.
    """
    return AscendDryRun(torch_npu, cache_dir=cache_dir, dump_dir=dump_dir)


def active() -> AscendDryRun | None:
    """The dry run in progress, or None."""
    return _active


def run_script(
    script: str,
    args: list[str],
    *,
    torch_npu: str | None = None,
    dump_dir: str | None = None,
    out: Any = None,
) -> int:
    """``python -m npu_optim_compile dry-run script.py [args]``: run ``script`` as
    ``__main__`` under :func:`ascend_dry_run`, then print one line per GE graph. Returns
    the exit status (the script's own, or 1 when it raised)."""
    import runpy
    import traceback

    out = out or sys.stdout
    status = 0
    saved_argv, saved_path = sys.argv, list(sys.path)
    with ascend_dry_run(torch_npu, dump_dir=dump_dir) as graphs:
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py`
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - report it with what reached GE so far
            traceback.print_exc()
            status = 1
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path
    print(f"\nascend_dry_run: {len(graphs)} GE graph(s) reached GE", file=out)
    for g in graphs:
        print(f"  {g.summary()}; evaluated {g.runs} time(s)", file=out)
    if dump_dir is not None:
        print(f"GE graphs written under {os.path.abspath(dump_dir)}", file=out)
    return status
