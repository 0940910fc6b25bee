"""Python stand-ins for torchair's four C extensions, which need CANN.

torchair (torch_npu 2.13.0, ``torch_npu/dynamo/torchair/core/``) loads
``_torchair``, ``_npu_graph_executor``, ``_npu_utils`` and ``_abi_compat_ge_apis`` as
``.so`` files linked against CANN's Graph Engine. Everything else in torchair is Python.
:func:`standin_modules` builds Python modules under those four names with the entry
points torchair calls (``torchair/core/_backend.py``, ``torchair/_ge_concrete_graph/fx2ge_converter.py``,
``compat_ir.py``). The one that matters is ``_torchair.TorchNpuGraphBase``, the base
class of torchair's ``TorchNpuGraph``:

- ``load(serialized_model_def, options, input_placements, output_dtypes, executor_type)``
  receives what GE would: a serialized ``ge.proto.ModelDef`` after torchair's conversion
  and its GE graph passes. The stand-in records it (:class:`GeGraphRecord`) and, with a
  dump folder, writes it as text.
- ``compile()`` does nothing: compiling a GE graph needs CANN.
- ``run((inputs, assigned_outputs, stream))`` evaluates the recorded graph op by op
  (:mod:`npu_optim_compile._ge_eval`) on the CPU tensors torchair passes. An output with
  an assigned tensor (an output that reuses an input's memory: a param or state update)
  is written into that tensor, as GE writes into it.

Entry points that only CANN could answer say so: ``get_registered_ir_def`` (CANN's
operator registry, used only to generate converters for ops torchair has none for)
answers "ERROR" (not registered); ``check_cann_compat`` answers "" (compatible: there is
no CANN to compare the graph's optional inputs and attributes with); device-side dumps,
AOE tuning and exports raise, naming what needs an NPU.
"""

from __future__ import annotations

import enum
import os
import re
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _ge_eval

__all__ = ["GeGraphRecord", "TorchDataType", "STANDIN_NAMES", "standin_modules"]

#: The C extensions of torchair replaced by :func:`standin_modules`.
STANDIN_NAMES = tuple(
    f"torchair.core.{name}" for name in ("_torchair", "_npu_graph_executor", "_npu_utils", "_abi_compat_ge_apis")
)


class TorchDataType(enum.IntEnum):
    """``_torchair.TorchDataType``: the dtype codes of ``load``'s ``output_dtypes``
    (``torchair/ge/_ge_graph.py`` maps torch dtypes to them)."""

    BOOL = 0
    UINT8 = 1
    INT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    BF16 = 9
    FLOAT16 = 10
    FLOAT32 = 11
    FLOAT64 = 12
    COMPLEX64 = 13
    COMPLEX128 = 14


@dataclass(eq=False)
class GeGraphRecord:
    """One GE graph that reached ``TorchNpuGraphBase.load``, as GE would receive it.

    Attributes:
        name: torchair's graph name (``graph_1``, ...).
        graph_def: the ``ge.proto.GraphDef`` (torchair's ``ge_ir_pb2``).
        options: the GE compile options torchair passed.
        input_placements: per Data node, torchair's placement code (0 host, 1 device).
        runs: how often the graph was evaluated.
    """

    name: str
    graph_def: Any
    options: dict[str, str]
    input_placements: list[int]
    runs: int = 0
    op_counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.op_counts = Counter(op.type for op in self.graph_def.op)

    @property
    def node_count(self) -> int:
        return sum(self.op_counts.values())

    @property
    def cast_count(self) -> int:
        return self.op_counts["Cast"]

    def dtypes(self) -> set[str]:
        """Every dtype named in the graph (``DT_FLOAT``, ...): output and input
        descriptions, Const values and Cast targets."""
        return _ge_eval.dtypes_in(self.graph_def)

    def summary(self) -> str:
        ops = ", ".join(f"{t} {n}" for t, n in sorted(self.op_counts.items()))
        return f"{self.name}: {self.node_count} nodes, {self.cast_count} Cast ({ops})"


def _needs_npu(what: str) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{what} needs an Ascend NPU with CANN; ascend_dry_run() cannot do it")

    return unavailable


def _graph_base(records: list[GeGraphRecord], dump_dir: str | None) -> type:
    # Each method stands in for C++ that Dynamo cannot see into, hence
    # torch._dynamo.disable: with CPU tensors autograd runs the backward (and GE's run of
    # the backward graph) on the calling thread, inside a user's torch.compile'd frame,
    # where Dynamo would otherwise trace the interpreter.
    class TorchNpuGraphBase:
        """``_torchair.TorchNpuGraphBase`` (module docstring)."""

        def __init__(self, name: str = "") -> None:
            self._name = name
            self._record: GeGraphRecord | None = None

        @torch._dynamo.disable
        def load(self, serialized_model_def, options, input_placements, output_dtypes, executor_type) -> None:
            from torchair._ge_concrete_graph.ge_ir_pb2 import ModelDef  # torchair is importable here

            model = ModelDef()
            model.ParseFromString(serialized_model_def)
            if len(model.graph) != 1:
                raise RuntimeError(f"expected one GE graph per ModelDef, got {len(model.graph)}")
            graph = model.graph[0]
            self._record = GeGraphRecord(graph.name or self._name, graph, dict(options), list(input_placements))
            records.append(self._record)
            if dump_dir is not None:
                from google.protobuf import text_format

                safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self._record.name)
                path = os.path.join(dump_dir, f"ge_{len(records):03d}_{safe}.pbtxt")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text_format.MessageToString(graph))

        @torch._dynamo.disable
        def set_hint_shape(self, input_shapes, output_shapes) -> None:
            pass  # GE's shape hints for compilation

        @torch._dynamo.disable
        def compile(self) -> None:
            pass  # GE compilation needs CANN (module docstring)

        @torch._dynamo.disable
        def auto_tune(self, args) -> None:
            _needs_npu("AOE auto-tuning")()

        @torch._dynamo.disable
        def run(self, args: Sequence[Any]) -> list[torch.Tensor]:
            inputs, assigned_outputs = args[0], (args[1] if len(args) > 1 else None)
            if self._record is None:
                raise RuntimeError("TorchNpuGraphBase.run before load")
            outputs = _ge_eval.evaluate(self._record.graph_def, list(inputs))
            self._record.runs += 1
            for i, target in enumerate(assigned_outputs or ()):
                if target is not None:  # GE writes this output into the input's memory
                    target.copy_(outputs[i])
                    outputs[i] = target
            return outputs

    return TorchNpuGraphBase


def standin_modules(records: list[GeGraphRecord], dump_dir: str | None = None) -> dict[str, types.ModuleType]:
    """The four stand-in modules, keyed by their ``sys.modules`` names; every GE graph
    loaded goes into ``records`` (and, with ``dump_dir``, into a ``.pbtxt`` file there)."""
    torchair_c = types.ModuleType(STANDIN_NAMES[0], "ascend_dry_run's stand-in for torchair's _torchair.so")
    torchair_c.TorchDataType = TorchDataType
    torchair_c.TorchNpuGraphBase = _graph_base(records, dump_dir)
    torchair_c.InitializeGraphEngine = lambda options: None
    torchair_c.FinalizeGraphEngine = lambda: None
    torchair_c.check_cann_compat = lambda op_type, optional_inputs, optional_attrs: ""
    torchair_c.get_registered_ir_def = lambda op_type: ("ERROR", [], [], [])
    torchair_c.SetDebugLogPath = lambda path: None
    torchair_c.InitDeviceStdoutChannel = lambda device_id: None
    torchair_c.GetSocName = lambda: "ascend_dry_run"
    for name, what in (
        ("AclmdlSetDump", "a GE data dump"),
        ("AclopStartDumpArgs", "an ACL op argument dump"),
        ("AclopStopDumpArgs", "an ACL op argument dump"),
        ("export", "exporting a GE graph (torchair.dynamo_export)"),
        ("as_torch_tensors", "wrapping device memory as tensors (llm_datadist)"),
        ("StupidRepeat", "torchair's C++ self-test"),
    ):
        setattr(torchair_c, name, _needs_npu(what))
    executor = types.ModuleType(STANDIN_NAMES[1], "ascend_dry_run's stand-in for _npu_graph_executor.so")
    executor.GetNpuStorageSizes = _needs_npu("reading an NPU tensor's storage sizes")
    utils = types.ModuleType(STANDIN_NAMES[2], "ascend_dry_run's stand-in for _npu_utils.so")
    utils.NpuFormatCastViaCpu = _needs_npu("an NPU format cast")
    abi = types.ModuleType(STANDIN_NAMES[3], "ascend_dry_run's stand-in for _abi_compat_ge_apis.so")
    return {m.__name__: m for m in (torchair_c, executor, utils, abi)}
