"""The aten/prims op overloads that torchair's GE (max-autotune) mode can convert.

In torchair's max-autotune mode every FX node must have a GE converter; an aten op
without one, or whose converter is a stub that only raises, fails the compile (torch_npu
2.13.0, ``torch_npu/dynamo/torchair/_ge_concrete_graph/fx2ge_converter.py``: a node's
converter is ``op._ge_converter``; ``get_or_auto_gen_converter`` would generate one, but
``_validate_support`` rejects every aten/prims op as a builtin; the converters live in
``_ge_concrete_graph/ge_converter/aten/``, where some bodies are a single ``raise``,
e.g. ``_foreach_sqrt.default`` and ``sub.Scalar``). ``ge_allowlist.json`` beside this file lists the
overloads with a working converter in torch_npu 2.13.0's wheel. The developer tool
``tools/ge_allowlist.py`` (not part of the installed package) regenerates it from the
wheel; this module only reads it.

A working converter may still reject some arguments at conversion time (e.g.
``_native_batch_norm_legit`` with ``training=False``): the list is necessary, not
sufficient.
"""

from __future__ import annotations

import functools
import json
import operator
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ALLOWLIST_PATH", "GE_NAMESPACES", "load_ge_allowlist", "op_name", "unsupported_ops"]

ALLOWLIST_PATH = Path(__file__).with_name("ge_allowlist.json")
#: The op namespaces the allow-list covers.
GE_NAMESPACES = ("aten", "prims")


@functools.cache
def load_ge_allowlist() -> frozenset[str]:
    """The committed set of op overloads with a working GE converter, e.g. ``"aten.mul.Tensor"``."""
    with open(ALLOWLIST_PATH, encoding="utf-8") as f:
        return frozenset(json.load(f)["ops"])


def op_name(target: Any) -> str:
    """``torch.ops.aten.mul.Tensor`` -> ``"aten.mul.Tensor"``; packets give ``"aten.mul"``.

    Other callables give their qualified Python name (``"_operator.getitem"``).
    """
    if isinstance(target, torch._ops.OpOverload):
        ns, _, name = target._schema.name.partition("::")
        return f"{ns}.{name}.{target._overloadname}"
    if isinstance(target, torch._ops.OpOverloadPacket):
        ns, _, name = target._qualified_op_name.partition("::")
        return f"{ns}.{name}"
    module = getattr(target, "__module__", None) or ""
    qualname = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    return f"{module}.{qualname}" if module else qualname


def unsupported_ops(graph: torch.fx.Graph, allowlist: Iterable[str] | None = None) -> list[str]:
    """Sorted aten/prims overloads called in ``graph`` that GE cannot convert.

    Only ``call_function`` nodes whose target is an aten/prims ``OpOverload`` are checked;
    ``operator.getitem`` and other Python callables are ignored. ``allowlist`` defaults to
    :func:`load_ge_allowlist`.
    """
    allowed = load_ge_allowlist() if allowlist is None else frozenset(allowlist)
    missing = set()
    for node in graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not isinstance(node.target, torch._ops.OpOverload):
            continue
        name = op_name(node.target)
        if name.split(".", 1)[0] in GE_NAMESPACES and name not in allowed:
            missing.add(name)
    return sorted(missing)
