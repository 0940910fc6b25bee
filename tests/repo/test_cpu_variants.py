"""Another CPU's rounding, reproduced in a subprocess: a numeric subset under
ATEN_CPU_CAPABILITY=default (scalar ATen and scalar inductor kernels), and the
``--inductor-simdlen`` option of tests/support/cpu_variants.py.

README's Development section runs the whole suite under each variant; this keeps a
small part of it in every run of the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# The comparisons with torch that are closest to their tolerance on some CPU (the
# channels-last one failed on an AVX-512 Xeon at the old tolerance), and their fp64 checks.
NUMERIC_SUBSET = [
    "tests/optimizer/test_realloc.py::test_model_to_channels_last",
    "tests/optimizer/test_accuracy.py::test_channels_last_model",
    "tests/optimizer/test_parity.py::test_dtypes",
    "tests/optimizer/test_parity.py::test_torch_configs",
    "-k",
    "not test_torch_configs or inductor_fp32",
]

PROBE = '''
import torch
from cpu_variants import inductor_isa

def test_variant_is_in_force(pytestconfig):
    assert torch.backends.cpu.get_cpu_capability() == {capability!r}
    assert torch._inductor.config.cpp.simdlen == {simdlen!r}
    assert inductor_isa() == {isa!r}
'''


def run_pytest(args, *, capability=None, cache="default", timeout=900):
    """pytest in a fresh interpreter with this repository's configuration, its own inductor
    cache per variant (torch's cache does not key on ATEN_CPU_CAPABILITY)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(Path(tempfile.gettempdir()) / f"npu_optim_compile-inductor-{cache}"))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def probe(tmp_path, **expected) -> str:
    path = tmp_path / "test_probe.py"
    path.write_text(PROBE.format(**expected))
    return str(path)


def test_numeric_subset_passes_with_scalar_kernels(tmp_path):
    check = probe(tmp_path, capability="DEFAULT", simdlen=None, isa="scalar")
    out = run_pytest([check, *NUMERIC_SUBSET], capability="default", cache="aten-default")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "ATen CPU capability DEFAULT (ATEN_CPU_CAPABILITY=default)" in out.stdout  # the report header


def test_simdlen_option_sets_inductor_config(tmp_path):
    """--inductor-simdlen 0 asks for a width no CPU has: scalar C++ kernels, ATen unchanged."""
    import torch

    check = probe(tmp_path, capability=torch.backends.cpu.get_cpu_capability(), simdlen=0, isa="scalar")
    # The child keeps this process's ATEN_CPU_CAPABILITY (the suite may run under one),
    # with a cache of its own for it.
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    out = run_pytest([check, "--inductor-simdlen", "0"], capability=capability, cache=f"simdlen0-{capability or 'native'}")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "inductor cpp.simdlen=0" in out.stdout
