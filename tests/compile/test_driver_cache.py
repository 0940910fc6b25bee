"""Segment drivers kept on disk (``_driver_cache.py``): a new process with the same
inductor cache folder loads the driver instead of compiling, with the same results; a
change of vector ISA, or clear_cache(), compiles again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from npu_optim_compile import _bucket_step, _driver_cache
from npu_optim_compile._bucket_step import StepKey

SCRIPT = r"""
import json, torch
from npu_optim_compile import NpuFusedRMSprop, _bucket_step
g = torch.Generator().manual_seed(0)
params = [torch.nn.Parameter(torch.randn(n, generator=g)) for n in (300, 7, 64)]
opt = NpuFusedRMSprop(params, lr=0.01, momentum=0.9)
for step in range(3):
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
print(json.dumps({"compiles": sum(_bucket_step.compile_counts().values()),
                  "kind": opt._engine.describe()[0]["kind"],
                  "params": [p.detach().tolist() for p in params]}))
"""


def run(cache: str, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, **env},
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_new_process_loads_the_driver_and_gets_the_same_results(tmp_path):
    cache = str(tmp_path / "inductor")
    first = run(cache)
    second = run(cache)
    assert first["kind"] == second["kind"] == "segments"
    assert first["compiles"] == 1 and second["compiles"] == 0
    assert first["params"] == second["params"]  # bit for bit: the same kernel


def test_the_key_holds_the_vector_isa(monkeypatch):
    """ATEN_CPU_CAPABILITY changes the ISA inductor generates for; a driver built for
    another one would not compile (inductor's own cache misses this: README)."""
    import torch._inductor.cpu_vec_isa as isa

    key = StepKey("inductor", "cpu", torch.float32, executor="segments")
    here = _driver_cache._path(key)
    monkeypatch.setattr(isa, "pick_vec_isa", lambda: "another ISA")
    assert _driver_cache._path(key) != here


def test_clear_cache_forgets_the_stored_drivers(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    key = StepKey("inductor", "cpu", torch.float32, executor="segments")
    _driver_cache.store(key, "// a driver")
    assert _driver_cache.load(key) == "// a driver"
    assert _driver_cache.load(StepKey("inductor", "cpu", torch.float64, executor="segments")) is None
    _bucket_step.clear_cache()
    assert _driver_cache.load(key) is None
