"""Build a torchair (Ascend NPU) ``torch.compile`` backend with its own CompilerConfig.

Every compile gets a fresh ``torchair.CompilerConfig()``. We never use
``backend="npu"`` (torch_npu caches one process-wide config behind it:
``_get_global_npu_backend`` in torch_npu 2.13.0's ``torch_npu/dynamo/__init__.py``) nor
the ``options=`` dict (``_process_kwargs_options`` in torchair's
``torchair/configs/npugraphex_config.py`` writes every option onto the ``_NpuGraphExConfig`` class
and, for ``"npu"``, into that shared config): both leak settings into unrelated compiles.

Modes (``CompilerConfig.mode``):

- ``"max-autotune"``: torchair converts the FX graph to a CANN Graph Engine (GE) graph.
  Every aten op needs a working GE converter, see
  :mod:`npu_optim_compile.passes.ge_ops`.
- ``"reduce-overhead"`` (deprecated by torchair) and ``"npugraph_ex"``: the graph runs
  op by op with eager NPU kernels and is captured into an ACL graph that is replayed.

Static inputs in the ACL-graph modes
------------------------------------
On replay, torchair copies every tensor input that is not *static* into the buffer the
graph was captured with (``torch._foreach_copy_``, one full copy of each input per
step). An input is static when its AOT placeholder carries ``_torchair_is_parameter``,
which torchair sets for AOT's ``static_input_indices``: ``nn.Parameter`` inputs and
tensors marked with ``torch._dynamo.mark_static_address`` (any mark: ``"guarded"`` or
``"unguarded"``). A static input is read in place; its address becomes part of the ACL
graph key, so a new address triggers a re-capture, and after
``debug.aclgraph.static_capture_size_limit`` (64) captures torchair falls back to eager
for good, with a warning. ``make_torchair_backend(static_inputs=True)`` (the default)
marks *every* tensor input of each compiled graph static (see
:func:`_mark_all_inputs_static`): right for the optimizer step, whose inputs are all
buffers the optimizer owns; wrong for graphs fed fresh tensors each call (grads
re-allocated by ``zero_grad(set_to_none=True)`` that do not live in a persistent
buffer): each call would re-capture. With ``static_inputs=False`` only what the caller
marked with ``torch._dynamo.mark_static_address`` (eagerly, before the first call:
Dynamo reads the mark when it traces) is static.

GE (max-autotune) reads all inputs in place anyway; the marks change nothing there.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch

from ._npu import require_torchair

__all__ = ["MODES", "ACL_GRAPH_MODES", "make_torchair_backend"]

MODES = ("max-autotune", "reduce-overhead", "npugraph_ex")
ACL_GRAPH_MODES = ("reduce-overhead", "npugraph_ex")

# torchair's GE dump writes .txt/.py/.pbtxt; its ACL-graph dump accepts only "py"
# (fx2acl_converter.py raises NotImplementedError otherwise).
_DUMP_TYPE = {"max-autotune": "pbtxt", "reduce-overhead": "py", "npugraph_ex": "py"}

PostGradPass = Callable[[torch.fx.GraphModule, list, Any], None]


def _mark_all_inputs_static(gm: torch.fx.GraphModule) -> int:
    """Mark every tensor placeholder of a Dynamo graph static, as mark_static_address would.

    AOT autograd (torch 2.13, ``_try_get_metadata_from_dynamo``) builds
    ``static_input_indices`` from ``node.meta["tensor_dict"]["_dynamo_static_input_type"]``
    of the placeholders; torchair reads those indices. Returns the number marked.
    """
    marked = 0
    for node in gm.graph.find_nodes(op="placeholder"):
        tensor_dict = node.meta.get("tensor_dict")
        if tensor_dict is not None and isinstance(node.meta.get("example_value"), torch.Tensor):
            tensor_dict.setdefault("_dynamo_static_input_type", "unguarded")
            marked += 1
    return marked


def _with_static_inputs(backend: Callable[..., Any]) -> Callable[..., Any]:
    def static_inputs_backend(gm: torch.fx.GraphModule, example_inputs: list, **kwargs: Any) -> Any:
        _mark_all_inputs_static(gm)
        return backend(gm, example_inputs, **kwargs)

    static_inputs_backend.inner = backend  # type: ignore[attr-defined]
    return static_inputs_backend


def make_torchair_backend(
    *,
    mode: str = "max-autotune",
    post_grad_pass: PostGradPass | None = None,
    dump_dir: str | os.PathLike[str] | None = None,
    static_inputs: bool = True,
) -> Callable[..., Any]:
    """Return a ``torch.compile`` backend for Ascend NPUs built on a private CompilerConfig.

    Args:
        mode: ``"max-autotune"`` (GE graph), ``"reduce-overhead"`` or ``"npugraph_ex"``
            (ACL graph). ``torch.compile(mode=...)`` is ignored by torchair; set it here.
        post_grad_pass: installed as ``post_grad_custom_pre_pass``: called as
            ``post_grad_pass(gm, example_inputs, config)`` on the functionalized post-AOT
            graph, must edit ``gm.graph`` in place (its return value is ignored).
        dump_dir: when set, torchair dumps each graph it builds there (created if
            missing): GE graphs as ``.pbtxt``, ACL graphs as ``.py``.
        static_inputs: in the ACL-graph modes, treat every tensor input as static so
            replays never copy inputs (module docstring). No effect in max-autotune.

    Raises:
        ValueError: unknown ``mode`` (checked before torchair is imported).
        TypeError: ``post_grad_pass`` is not callable.
        RuntimeError: torch_npu/torchair cannot be imported (says what is missing).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
    if post_grad_pass is not None and not callable(post_grad_pass):
        raise TypeError(
            "post_grad_pass must be a callable (gm, example_inputs, config) -> None or None, "
            f"got {type(post_grad_pass).__name__}"
        )
    torchair = require_torchair(f"make_torchair_backend(mode={mode!r})")
    cfg = torchair.CompilerConfig()
    cfg.mode = mode
    cfg.post_grad_custom_pre_pass = post_grad_pass
    if dump_dir is not None:
        path = os.fspath(dump_dir)
        os.makedirs(path, exist_ok=True)
        cfg.debug.graph_dump.type = _DUMP_TYPE[mode]
        cfg.debug.graph_dump.path = path
    backend = torchair.get_npu_backend(compiler_config=cfg)
    if static_inputs and mode in ACL_GRAPH_MODES:
        return _with_static_inputs(backend)
    return backend
