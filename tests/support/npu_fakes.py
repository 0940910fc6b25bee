"""Fakes for torch_npu and torchair, which cannot be installed here (imported by the tests)."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import types
from typing import Any, Callable

import torch

AUTOLOAD = "TORCH_DEVICE_BACKEND_AUTOLOAD"


class FakeFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """A meta-path finder serving one module name; ``body(module)`` runs on import.

    With ``body=None`` the name is reported as not installed (ModuleNotFoundError from
    find_spec), hiding any real installation.
    """

    def __init__(self, name: str, body: Callable[[types.ModuleType], None] | None):
        self.name, self.body, self.imports = name, body, 0

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        if self.body is None:
            raise ModuleNotFoundError(f"No module named {fullname!r}", name=fullname)
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.imports += 1
        self.body(module)


def fake_torch_npu_ok(device_count: int) -> Callable[[types.ModuleType], None]:
    """Body of a torch_npu that imports fine and exposes ``device_count`` devices."""

    def body(module: types.ModuleType) -> None:
        module.__version__ = "2.13.0"
        # npu_env's monkeypatch restores torch.npu on teardown.
        torch.npu = types.SimpleNamespace(
            is_available=lambda: device_count > 0, device_count=lambda: device_count
        )

    return body


# --- a duck-typed torchair: closed, validated option tree like torchair's NpuBaseConfig ---


class FakeOption:
    def __init__(self, default: Any, optional: list | None = None):
        self.default, self.optional, self._value = default, optional, default

    @property
    def value(self) -> Any:
        return self._value

    @value.setter
    def value(self, v: Any) -> None:
        if isinstance(self.optional, list) and v not in self.optional:
            raise ValueError(f"Value {v!r} not in optional list {self.optional!r}")
        self._value = v


class FakeCallableOption(FakeOption):
    @FakeOption.value.setter
    def value(self, v: Any) -> None:
        if v is not None and not callable(v):
            raise TypeError(f"value must be Callable or None, got {type(v)}")
        self._value = v


class FakeBaseConfig:
    def __init__(self) -> None:
        self._fixed_attrs = [k for k, v in vars(self).items() if isinstance(v, (FakeOption, FakeBaseConfig))]

    def __setattr__(self, key: str, value: Any) -> None:
        if hasattr(self, "_fixed_attrs"):
            if key not in self._fixed_attrs:
                raise ValueError(f"{type(self).__name__} has no option {key}, options {self._fixed_attrs}")
            current = getattr(self, key)
            if isinstance(current, FakeOption):
                current.value = value
                return
        super().__setattr__(key, value)


class FakeDump(FakeBaseConfig):
    def __init__(self) -> None:
        self.type = FakeOption(None, ["txt", "pbtxt", "py"])
        self._path = FakeOption(None)
        super().__init__()
        self._fixed_attrs.append("path")

    @property
    def path(self) -> str | None:
        return self._path.value

    @path.setter
    def path(self, value: str) -> None:
        self._path.value = os.path.realpath(value)


class FakeDebug(FakeBaseConfig):
    def __init__(self) -> None:
        self.graph_dump = FakeDump()
        super().__init__()


class FakeCompilerConfig(FakeBaseConfig):
    def __init__(self) -> None:
        self.debug = FakeDebug()
        self.mode = FakeOption("max-autotune", ["max-autotune", "reduce-overhead", "npugraph_ex"])
        self.post_grad_custom_pre_pass = FakeCallableOption(None)
        self.post_grad_custom_post_pass = FakeCallableOption(None)
        super().__init__()


def changed_options(cfg: FakeBaseConfig, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """{attribute path: value} of every option that differs from its default."""
    out: dict[tuple[str, ...], Any] = {}
    for key in cfg._fixed_attrs:
        if key.startswith("_"):
            continue  # storage behind a property (graph_dump._path behind .path)
        attr = getattr(cfg, key)
        if isinstance(attr, FakeBaseConfig):
            out.update(changed_options(attr, prefix + (key,)))
        elif isinstance(attr, FakeOption):
            if attr.value != attr.default:
                out[prefix + (key,)] = attr.value
        elif attr is not None:  # a property such as graph_dump.path
            out[prefix + (key,)] = attr
    return out


def fake_npu_backend(gm, example_inputs, compiler_config=None, decompositions=None, **kwargs):
    """Stands in for torchair's ``_npu_backend``: AOT autograd, records the static inputs."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._inductor.compile_fx import get_static_input_idxs

    def fw_compiler(aot_gm, aot_inputs):
        fake_npu_backend.static_input_idxs = list(get_static_input_idxs(len(aot_inputs)))
        return aot_gm

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler)


def fake_torchair_body(calls: list) -> Callable[[types.ModuleType], None]:
    def get_npu_backend(*, compiler_config=None, custom_decompositions={}):  # noqa: B006 - mirrors torchair
        calls.append({"compiler_config": compiler_config, "custom_decompositions": custom_decompositions})
        backend = functools.partial(fake_npu_backend, compiler_config=compiler_config)
        backend.compiler_config = compiler_config
        return backend

    def body(module: types.ModuleType) -> None:
        module.CompilerConfig = FakeCompilerConfig
        module.get_npu_backend = get_npu_backend

    return body
