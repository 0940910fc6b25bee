"""What importing and using torchair changes in a process, and undoing it.

torchair (torch_npu 2.13.0) changes process-wide state when it is imported and when its
first backend is built (``get_npu_backend`` runs ``torchair/_utils/__init__.py::add_npu_patch``
once):

- ``torchair/core/_backend.py``: SIGINT/SIGTERM handlers and an ``atexit`` hook;
- ``torchair/core/utils.py``: ``logging.setLoggerClass`` and ``logging.addLevelName(35, "EVENT")``,
  its ``torchair`` logger;
- every converter sets ``op._ge_converter`` on a torch op (``fx2ge_converter.py``);
- ``torch.library.Library`` fragments in the ``air``, ``npu``, ``npu_define`` and
  ``npu_inference`` namespaces;
- ``torchair/_utils/adjust_traceable_collective_remaps.py``: entries of
  ``torch.distributed._functional_collectives.traceable_collective_remaps``;
- ``add_npu_patch``: Python kernels of aten ops (``py_impl``: ``to.other``,
  ``type_as``, ``matmul_backward``, Meta kernels of dropout and batch norm; removed
  kernels of ``upsample_nearest2d``), entries of ``torch._decomp.decomposition_table``,
  and module functions of torch (fake tensor's ``torch_decomp_decompositions`` and
  ``get_fast_op_impls``; Dynamo's ``InstructionTranslatorBase`` opcodes with
  ``BREAK_GRAPH_OP_LIST`` set).

:class:`ProcessState` records what it needs on entry and :meth:`ProcessState.restore`
puts it back: everything listed, and more generally every module attribute, decomposition
or Python kernel that now holds a function of torchair's (its ``__module__`` is in
torchair), whatever torchair version set it. Things torch itself adds meanwhile (lazy
registrations) are left alone. Not undone: ``experimental_config.npu_fx_pass=True``
clears inductor's joint-graph patterns (torchair's ``npu_patch_fx_pass``).
"""

from __future__ import annotations

import atexit
import gc
import logging
import signal
import sys
import threading
import types
import warnings
from typing import Any

import torch

__all__ = ["ProcessState", "SERVED", "TORCHAIR_NAMESPACES", "converter_holders", "gc_objects"]

#: Top-level packages served from torchair's folder.
SERVED = ("torchair", "npugraph_ex")
#: torch.library namespaces torchair 2.13.0 registers ops in (``torchair/ops/_lib.py``,
#: ``torchair/scope/_lib.py``, ``_contrib/custom_torch_ops/``, ``ge_converter/experimental/``).
TORCHAIR_NAMESPACES = frozenset({"air", "npu", "npu_define", "npu_inference"})
_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_MISSING = object()


def gc_objects(kind: type | tuple[type, ...]) -> list[Any]:
    """Every live object of ``kind`` (by type, so weak proxies never raise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [o for o in gc.get_objects() if issubclass(type(o), kind)]


def _from_torchair(value: Any) -> bool:
    module = getattr(value, "__module__", None)
    return isinstance(module, str) and module.partition(".")[0] in SERVED


def converter_holders() -> list[Any]:
    """Everything a GE converter is attached to (``op._ge_converter``): torch's op
    overloads and packets, higher-order ops, Python functions (``torch.sym_float``)."""
    from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket

    kinds = (OpOverload, OpOverloadPacket, HigherOrderOperator, types.FunctionType)
    return [o for o in gc_objects(kinds) if "_ge_converter" in getattr(o, "__dict__", ())]


def _dynamo_opcodes() -> type:
    from torch._dynamo.symbolic_convert import InstructionTranslatorBase

    return InstructionTranslatorBase


class ProcessState:
    """A record of the state torchair changes, taken before torchair is imported."""

    def __init__(self) -> None:
        from torch._decomp import decomposition_table
        from torch._ops import OpOverload
        from torch.library import Library
        import torch.distributed._functional_collectives as fc

        self.modules = {n: m for n, m in sys.modules.items() if n.partition(".")[0] in SERVED}
        self.signals = {s: signal.getsignal(s) for s in _SIGNALS}
        self.logging = (
            logging.getLoggerClass(),
            dict(logging._levelToName),  # noqa: SLF001 - addLevelName writes these two
            dict(logging._nameToLevel),  # noqa: SLF001
            set(logging.Logger.manager.loggerDict),
        )
        self.torch_ops = set(vars(torch.ops))
        self.libraries = {id(lib) for lib in gc_objects(Library)}
        self.remaps = dict(fc.traceable_collective_remaps)
        self.decompositions = dict(decomposition_table)
        self.py_kernels = {op: dict(op.py_kernels) for op in gc_objects(OpOverload)}
        self.module_dicts = {
            name: dict(vars(m)) for name, m in list(sys.modules.items()) if name.startswith("torch") and m is not None
        }
        self.opcodes = {k: v for k, v in vars(_dynamo_opcodes()).items() if k.isupper()}

    def restore(self) -> None:
        """Undo torchair's changes (module docstring); ``sys.modules`` last."""
        backend = sys.modules.get("torchair.core._backend")
        if backend is not None:
            atexit.unregister(backend.finalize_graph_engine)
        if threading.current_thread() is threading.main_thread():
            for s, handler in self.signals.items():
                if handler is not None:
                    signal.signal(s, handler)
        self._restore_ops()
        self._restore_modules()
        self._restore_logging()
        for name in [n for n in sys.modules if n.partition(".")[0] in SERVED]:
            del sys.modules[name]
        sys.modules.update(self.modules)

    def _restore_ops(self) -> None:
        from torch._decomp import decomposition_table
        from torch._ops import OpOverload
        from torch.library import Library
        import torch.distributed._functional_collectives as fc

        for holder in converter_holders():
            del holder.__dict__["_ge_converter"]
        for lib in gc_objects(Library):
            if id(lib) not in self.libraries and lib.ns in TORCHAIR_NAMESPACES:
                lib._destroy()
        for name in set(vars(torch.ops)) - self.torch_ops:
            if name in TORCHAIR_NAMESPACES:
                delattr(torch.ops, name)
        fc.traceable_collective_remaps.clear()
        fc.traceable_collective_remaps.update(self.remaps)
        for op, fn in list(decomposition_table.items()):
            if _from_torchair(fn):
                previous = self.decompositions.get(op, _MISSING)
                if previous is _MISSING:
                    del decomposition_table[op]
                else:
                    decomposition_table[op] = previous
        for op in gc_objects(OpOverload):
            before = self.py_kernels.get(op, {})
            now = op.py_kernels
            changed = [k for k, fn in now.items() if _from_torchair(fn)] + [k for k in before if k not in now]
            for key in changed:
                if key in before:
                    now[key] = before[key]
                else:
                    del now[key]
            if changed:
                op._dispatch_cache.clear()

    def _restore_modules(self) -> None:
        for name, saved in self.module_dicts.items():
            module = sys.modules.get(name)
            if module is None:
                continue
            namespace = vars(module)
            for key, value in list(namespace.items()):
                if saved.get(key, _MISSING) is not value and _from_torchair(value):
                    previous = saved.get(key, _MISSING)
                    if previous is _MISSING:
                        delattr(module, key)
                    else:
                        setattr(module, key, previous)
        opcodes = _dynamo_opcodes()
        for key, value in self.opcodes.items():
            if vars(opcodes).get(key) is not value:
                setattr(opcodes, key, value)

    def _restore_logging(self) -> None:
        logger_class, level_to_name, name_to_level, loggers = self.logging
        logging.setLoggerClass(logger_class)
        logging._levelToName.clear()  # noqa: SLF001
        logging._levelToName.update(level_to_name)  # noqa: SLF001
        logging._nameToLevel.clear()  # noqa: SLF001
        logging._nameToLevel.update(name_to_level)  # noqa: SLF001
        manager = logging.Logger.manager
        for name in set(manager.loggerDict) - loggers:
            logger = manager.loggerDict[name]
            if name.partition(".")[0] in SERVED:
                del manager.loggerDict[name]
            elif isinstance(logger, logging.Logger) and type(logger) is not logger_class:
                logger.__class__ = logger_class  # created under torchair's logger class
