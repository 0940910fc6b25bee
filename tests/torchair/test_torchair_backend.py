"""npu_optim_compile._torchair_backend: what the builder sets (fake torchair), checked against the real wheel."""

from __future__ import annotations

import ast
import os
import sys
import warnings

import pytest
import torch
from npu_fakes import changed_options, fake_npu_backend

from npu_optim_compile import _torchair_backend as _torchair
import ge_allowlist

TORCHAIR = "torch_npu/dynamo/torchair"
ALL_MODES = ["max-autotune", "reduce-overhead", "npugraph_ex"]


def my_pass(gm, example_inputs, config):
    pass


def built_config(calls):
    assert len(calls) == 1, "get_npu_backend must be called exactly once per backend"
    return calls[0]["compiler_config"]


def test_rejects_unknown_mode_before_importing_torchair(npu_env):
    npu_env("torch_npu", None)  # torch_npu missing: a later check would raise RuntimeError
    with pytest.raises(ValueError, match="'max-autotune', 'reduce-overhead', 'npugraph_ex'.*'default'"):
        _torchair.make_torchair_backend(mode="default")
    assert "torchair" not in sys.modules


def test_without_torch_npu_says_what_is_missing(npu_env):
    npu_env("torch_npu", None)
    expected = r"make_torchair_backend\(mode='npugraph_ex'\) needs torchair.*not installed"
    with pytest.raises(RuntimeError, match=expected):
        _torchair.make_torchair_backend(mode="npugraph_ex")


def test_rejects_non_callable_pass(fake_torchair):
    with pytest.raises(TypeError, match="post_grad_pass must be a callable"):
        _torchair.make_torchair_backend(post_grad_pass="my_pass")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_sets_mode_and_pass_on_a_private_config(fake_torchair, mode):
    backend = _torchair.make_torchair_backend(mode=mode, post_grad_pass=my_pass)
    cfg = built_config(fake_torchair)
    assert changed_options(cfg) == (
        {("post_grad_custom_pre_pass",): my_pass}
        if mode == "max-autotune"
        else {("mode",): mode, ("post_grad_custom_pre_pass",): my_pass}
    )
    assert fake_torchair[0]["custom_decompositions"] == {}
    inner = getattr(backend, "inner", backend)  # ACL modes wrap torchair's backend
    assert inner.compiler_config is cfg


def test_each_backend_gets_its_own_config(fake_torchair):
    _torchair.make_torchair_backend(mode="npugraph_ex", post_grad_pass=my_pass)
    _torchair.make_torchair_backend(mode="max-autotune")
    first, second = (call["compiler_config"] for call in fake_torchair)
    assert first is not second
    assert first.mode.value == "npugraph_ex" and first.post_grad_custom_pre_pass.value is my_pass
    assert second.mode.value == "max-autotune" and second.post_grad_custom_pre_pass.value is None


@pytest.mark.parametrize(
    ("mode", "dump_type"), [("max-autotune", "pbtxt"), ("reduce-overhead", "py"), ("npugraph_ex", "py")]
)
def test_dump_dir(fake_torchair, tmp_path, mode, dump_type):
    dump_dir = tmp_path / "dumps" / mode
    _torchair.make_torchair_backend(mode=mode, dump_dir=dump_dir)
    options = changed_options(built_config(fake_torchair))
    assert options[("debug", "graph_dump", "type")] == dump_type
    assert options[("debug", "graph_dump", "path")] == os.path.realpath(dump_dir)
    assert dump_dir.is_dir()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_dump_by_default(fake_torchair, mode):
    _torchair.make_torchair_backend(mode=mode)
    assert built_config(fake_torchair).debug.graph_dump.type.value is None


def test_static_inputs_wrapper_only_in_acl_modes(fake_torchair):
    ge = _torchair.make_torchair_backend(mode="max-autotune", static_inputs=True)
    acl_plain = _torchair.make_torchair_backend(mode="npugraph_ex", static_inputs=False)
    acl_static = _torchair.make_torchair_backend(mode="npugraph_ex", static_inputs=True)
    assert not hasattr(ge, "inner") and not hasattr(acl_plain, "inner")
    assert acl_static.inner.compiler_config is fake_torchair[2]["compiler_config"]


def _sgd_step(params, grads, lr):
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(g * lr)


def _static_indices_after_compile(backend, params, grads, lr):
    """Compile a tiny in-place step and return AOT's static input indices (what torchair reads)."""
    torch._dynamo.reset()
    fake_npu_backend.static_input_idxs = None
    torch.compile(_sgd_step, backend=backend, dynamic=False)(params, grads, lr)
    torch._dynamo.reset()
    return fake_npu_backend.static_input_idxs


def _tensors():
    return [torch.ones(3), torch.ones(2)], [torch.ones(3), torch.ones(2)], torch.tensor(0.5)


def test_static_inputs_true_marks_every_tensor_input(fake_torchair):
    params, grads, lr = _tensors()
    backend = _torchair.make_torchair_backend(mode="npugraph_ex", static_inputs=True)
    assert _static_indices_after_compile(backend, params, grads, lr) == [0, 1, 2, 3, 4]
    assert params[0].tolist() == [0.5, 0.5, 0.5]  # the step still ran through AOT


def test_static_inputs_false_marks_only_what_the_caller_marked(fake_torchair):
    params, grads, lr = _tensors()
    backend = _torchair.make_torchair_backend(mode="npugraph_ex", static_inputs=False)
    assert _static_indices_after_compile(backend, params, grads, lr) == []
    for t in (*params, lr):
        torch._dynamo.mark_static_address(t, guard=False)
    # AOT input order follows Dynamo's placeholders: p0, g0, lr, p1, g1.
    assert _static_indices_after_compile(backend, params, grads, lr) == [0, 2, 3]


# --- the same names, checked in the real torch_npu 2.13.0 sources (read as text) ---


@pytest.fixture(scope="module")
def wheel_sources(torch_npu_wheel):
    with warnings.catch_warnings():  # some torchair files have invalid escape sequences
        warnings.simplefilter("ignore", (DeprecationWarning, SyntaxWarning))
        return {
            path[len(TORCHAIR) + 1 :]: ast.parse(text)
            for path, text in ge_allowlist.read_wheel_text(torch_npu_wheel, TORCHAIR + "/").items()
        }


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _classes(trees):
    return {n.name: n for tree in trees for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}


def _option_schema(cls: ast.ClassDef, classes) -> dict[str, tuple]:
    """{option: kind} for a torchair config class, following its base classes."""
    schema: dict[str, tuple] = {}
    for base in cls.bases:
        if isinstance(base, ast.Name) and base.id in classes:
            schema.update(_option_schema(classes[base.id], classes))
    init = next((f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == "__init__"), None)
    for node in ast.walk(init) if init else ():
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            target, call = node.targets[0], node.value
            if not (isinstance(target, ast.Attribute) and isinstance(call.func, ast.Name)):
                continue
            if call.func.id in classes and not call.func.id.endswith("Value"):  # a nested config
                schema[target.attr] = ("config", call.func.id)
            elif call.func.id == "OptionValue" and len(call.args) == 2:
                schema[target.attr] = ("option", ast.literal_eval(call.args[1]))
            else:
                schema[target.attr] = ("value", call.func.id)
        if (  # self._fixed_attrs.append("path") backed by a @path.setter property
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "append"
            and ast.unparse(node.func.value) == "self._fixed_attrs"
            and isinstance(node.args[0], ast.Constant)
        ):
            name = node.args[0].value
            methods = [f for f in cls.body if isinstance(f, ast.FunctionDef) and f.name == name]
            setter = any(f"{name}.setter" in map(ast.unparse, f.decorator_list) for f in methods)
            schema[name] = ("property",) if setter else schema.get(name, ("value", "?"))
    return schema


def _assert_settable(classes, path: tuple[str, ...], value) -> None:
    cls = "CompilerConfig"
    for part in path[:-1]:
        kind = _option_schema(classes[cls], classes).get(part)
        assert kind and kind[0] == "config", f"{cls}.{part} is not a nested config in the wheel: {kind}"
        cls = kind[1]
    kind = _option_schema(classes[cls], classes).get(path[-1])
    where = f"{cls}.{path[-1]} (config path {'.'.join(path)})"
    assert kind is not None, f"{where} does not exist in the wheel"
    if kind[0] == "option":
        assert value in kind[1], f"{where}: {value!r} not among {kind[1]}"
    elif kind[0] == "value":
        assert kind[1] == "CallableValue" and callable(value), f"{where} is {kind}, got {value!r}"
    else:
        assert kind == ("property",) and isinstance(value, str), f"{where} is {kind}"


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_option_the_builder_sets_exists_in_the_wheel(wheel_sources, fake_torchair, tmp_path, mode):
    configs = [tree for path, tree in wheel_sources.items() if path.startswith("configs/")]
    classes = _classes(configs)
    _torchair.make_torchair_backend(mode=mode, post_grad_pass=my_pass, dump_dir=tmp_path)
    options = changed_options(built_config(fake_torchair))
    options[("mode",)] = mode  # also check the default mode's value
    assert len(options) == 4
    for path, value in options.items():
        _assert_settable(classes, path, value)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("mode",), "default"),
        (("debug", "graph_dump", "type"), "json"),
        (("debug", "graph_dump", "format"), "py"),
        (("debug", "graph_dumps", "type"), "py"),
        (("post_grad_custom_pre_pass",), "not callable"),
        (("post_grad_custom_pass",), my_pass),
    ],
)
def test_wheel_schema_check_rejects_what_torchair_lacks(wheel_sources, path, value):
    classes = _classes(tree for p, tree in wheel_sources.items() if p.startswith("configs/"))
    with pytest.raises(AssertionError):
        _assert_settable(classes, path, value)


def test_public_torchair_names_exist_in_the_wheel(wheel_sources, fake_torchair):
    init = wheel_sources["__init__.py"]
    exported = next(
        ast.literal_eval(n.value)
        for n in init.body
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "__all__"
    )
    assert {"CompilerConfig", "get_npu_backend"} <= set(exported)
    get_npu_backend = _function(wheel_sources["npu_fx_compiler.py"], "get_npu_backend")
    _torchair.make_torchair_backend()
    used_kwargs = set(fake_torchair[0]) - {"custom_decompositions"}  # the fake logs defaults too
    assert used_kwargs <= {a.arg for a in get_npu_backend.args.kwonlyargs}


def test_acl_graph_dump_accepts_only_py(wheel_sources):
    """fx2acl_converter's dump() raises unless the path ends with '.py' (why ACL modes use "py")."""
    dump = _function(wheel_sources["_acl_concrete_graph/fx2acl_converter.py"], "dump")
    calls = [n for n in ast.walk(dump) if isinstance(n, ast.Call)]
    checks = [ast.unparse(n) for n in calls if ast.unparse(n.func) == "path.endswith"]
    assert checks == ["path.endswith('.py')"]


def test_acl_static_inputs_come_from_aot_static_input_indices(wheel_sources):
    """torchair marks AOT's static inputs `_torchair_is_parameter`, which ACL capture does not copy."""
    compiler = wheel_sources["npu_fx_compiler.py"]
    mark = _function(compiler, "_mark_static_inputs_attr")
    source = ast.unparse(mark)
    assert "get_static_input_idxs" in source and "'_torchair_is_parameter'" in source
    parse_input = ast.unparse(wheel_sources["_acl_concrete_graph/fx2acl_converter.py"])
    assert "hasattr(meta_outputs, '_torchair_is_parameter')" in parse_input
    assert "parameter_user_inputs.append" in parse_input
