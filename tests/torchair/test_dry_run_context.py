"""ascend_dry_run() as a context: what it changes inside, that leaving restores it all,
where it takes torchair from, its errors, and ``python -m npu_optim_compile dry-run``."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.distributed._functional_collectives as fc
from torch._decomp import decomposition_table
from torch._dynamo import trace_rules
from torch._subclasses import fake_tensor

from parity import make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop, _dry_run, _npu, _torchair_source, ascend_dry_run
from npu_optim_compile._hyper import hyper_dtype
from npu_optim_compile._dry_run import DryRunError
from npu_optim_compile._dry_run_state import TORCHAIR_NAMESPACES, converter_holders, gc_objects


aten = torch.ops.aten


def _libraries() -> set[int]:
    from torch.library import Library

    return {id(lib) for lib in gc_objects(Library) if lib.ns in TORCHAIR_NAMESPACES and lib.m is not None}


def process_state() -> dict:
    """Everything ascend_dry_run() or torchair's import may change in the process."""
    return {
        "modules": sorted(n for n in sys.modules if n.partition(".")[0] in ("torchair", "npugraph_ex", "torch_npu")),
        "meta_path": list(sys.meta_path),
        "signals": [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)],
        "logger_class": logging.getLoggerClass(),
        "level_names": dict(logging._levelToName),
        "loggers": {n for n in logging.Logger.manager.loggerDict if n.startswith("torchair")},
        "logger_classes": {type(lg) for lg in logging.Logger.manager.loggerDict.values()},
        "torch_ops": set(vars(torch.ops)) & TORCHAIR_NAMESPACES,
        "converters": len(converter_holders()),
        "libraries": _libraries(),
        "collectives": (set(vars(fc)), dict(fc.traceable_collective_remaps)),
        "skip_dirs": list(trace_rules.SKIP_DIRS),
        "decompositions": dict(decomposition_table),
        "py_kernels": {str(op): dict(op.py_kernels) for op in (aten.to.other, aten.type_as.default,
                                                                aten.native_dropout.default, aten.upsample_nearest2d.default)},
        "fake_tensor": (fake_tensor.torch_decomp_decompositions, fake_tensor.get_fast_op_impls),
        "debug_dir": torch._dynamo.utils.get_debug_dir,
        "npu_status": _npu.npu_status(),
        "cpu_is_npu": _npu.is_npu_device(torch.device("cpu")),
        "hyper_dtype": hyper_dtype(torch.device("cpu")),
    }


def _one_step(graphs) -> None:
    p = make_params()
    opt = NpuFusedRMSprop(p, momentum=0.9)  # backend="auto": torchair inside the dry run
    set_grads(0, p)
    opt.step()
    assert len(graphs) == 1 and graphs[0].runs == 2, [g.summary() for g in graphs]


@pytest.fixture
def atexit_hooks(monkeypatch):
    """The atexit hooks registered and not unregistered since the fixture started
    (CPython keeps no public list of them)."""
    live: list = []
    register, unregister = atexit.register, atexit.unregister

    def tracked_register(fn, *args, **kwargs):
        live.append(fn)
        return register(fn, *args, **kwargs)

    def tracked_unregister(fn):
        live[:] = [f for f in live if f != fn]
        return unregister(fn)

    monkeypatch.setattr(atexit, "register", tracked_register)
    monkeypatch.setattr(atexit, "unregister", tracked_unregister)
    return live


def _torchair_hooks(hooks) -> list:
    return [f for f in hooks if f.__module__.partition(".")[0] == "torchair"]


def test_leaving_restores_every_global_it_touched(torch_npu_wheel, atexit_hooks):
    _npu.npu_status()  # cache the real answer first (it is part of the state)
    before = process_state()
    for _ in range(2):  # and a second dry run starts from scratch (torchair imported again)
        with ascend_dry_run(torch_npu_wheel) as graphs:
            inside = process_state()
            assert "torchair" in inside["modules"] and "torchair.core._torchair" in inside["modules"]
            assert "torch_npu" not in inside["modules"]
            assert inside["npu_status"].available and "ascend_dry_run" in inside["npu_status"].reason
            assert inside["cpu_is_npu"] and inside["hyper_dtype"] == torch.float32
            assert inside["converters"] > 1000 and inside["libraries"] and _torchair_hooks(atexit_hooks)
            assert inside["signals"] != before["signals"] and inside["logger_class"] is not before["logger_class"]
            assert len(inside["skip_dirs"]) > len(before["skip_dirs"])
            with pytest.raises(DryRunError, match="already active"):
                ascend_dry_run(torch_npu_wheel).__enter__()
            _one_step(graphs)
            assert process_state()["py_kernels"] != before["py_kernels"]  # add_npu_patch ran
        assert process_state() == before
        assert _torchair_hooks(atexit_hooks) == []


def test_torch_npu_imported_means_a_real_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    with pytest.raises(DryRunError, match="torch_npu is imported in this process"):
        ascend_dry_run().__enter__()
    assert _dry_run.active() is None


def test_a_missing_source_says_what_was_given(tmp_path):
    with pytest.raises(_torchair_source.WheelUnavailableError, match="neither a torch_npu wheel nor a folder"):
        ascend_dry_run(tmp_path / "nowhere").__enter__()
    assert _dry_run.active() is None


def test_offline_says_how_to_point_at_a_wheel(tmp_path, monkeypatch):
    def offline(cmd, **kwargs):
        assert "download" in cmd and "--no-deps" in cmd  # never pip install
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version")

    monkeypatch.setattr(_torchair_source.subprocess, "run", offline)
    monkeypatch.delenv(_torchair_source.SOURCE_ENV, raising=False)
    monkeypatch.setattr(_torchair_source.importlib.util, "find_spec", lambda name: None)  # no torch_npu installed
    with pytest.raises(_torchair_source.WheelUnavailableError, match=r"ascend_dry_run\(torch_npu=PATH\).*NPU_OPTIM_COMPILE_TORCH_NPU"):
        _torchair_source.locate_torchair(cache_dir=tmp_path)


def test_sources_from_env_var_wheel_and_folders(torch_npu_wheel, monkeypatch):
    monkeypatch.setenv(_torchair_source.SOURCE_ENV, str(torch_npu_wheel))
    from_wheel = _torchair_source.locate_torchair()
    assert (from_wheel.folder / "torchair" / "__init__.py").is_file()
    assert not list(from_wheel.folder.rglob("*.so"))  # C extensions are never extracted
    assert from_wheel.torch_npu_version == _torchair_source.TORCH_NPU_VERSION
    monkeypatch.delenv(_torchair_source.SOURCE_ENV)
    from_folder = _torchair_source.locate_torchair(from_wheel.folder)  # a folder holding torchair/
    assert from_folder.folder == from_wheel.folder and from_folder.origin.startswith("folder")


def test_an_installed_torch_npu_is_found_not_imported(tmp_path, monkeypatch):
    """A torch_npu on sys.path is used for its torchair/ folder; its code never runs."""
    package = tmp_path / "site" / "torch_npu"
    (package / "dynamo" / "torchair").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('torch_npu was imported')\n")
    (package / "dynamo" / "torchair" / "__init__.py").write_text("")
    (package / "version.py").write_text("__version__ = '2.13.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv(_torchair_source.SOURCE_ENV, raising=False)
    found = _torchair_source.locate_torchair()
    assert found.folder == package / "dynamo" and found.origin.startswith("installed torch_npu")
    assert found.torch_npu_version == "2.13.0" and "torch_npu" not in sys.modules


def test_cli_runs_a_script_under_the_dry_run(torch_npu_wheel, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import torch
            from npu_optim_compile import NpuFusedRMSprop

            p = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(2, 3))]
            opt = NpuFusedRMSprop(p, lr=0.01)
            for _ in range(int(sys.argv[1])):
                for q in p:
                    q.grad = torch.randn_like(q)
                opt.step()
            print("trained", sys.argv[1:])
            """
        )
    )
    cmd = [sys.executable, "-m", "npu_optim_compile", "dry-run", "--torch-npu", str(torch_npu_wheel),
           "--dump", str(tmp_path / "ge"), str(script), "3", "--flag"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained ['3', '--flag']" in proc.stdout
    assert "1 GE graph(s) reached GE" in proc.stdout and "evaluated 4 time(s)" in proc.stdout
    assert len(list((tmp_path / "ge").glob("ge_001_*.pbtxt"))) == 1
