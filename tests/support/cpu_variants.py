"""A pytest plugin (``-p cpu_variants`` in pyproject's addopts) to reproduce other CPUs' rounding.

Another CPU rounds differently because it runs other vector instructions: an Intel Xeon
with AVX-512 (ATen's AVX512 kernels, inductor's 512-bit C++ kernels) against this
project's AMD EPYC with AVX2. Two knobs reproduce that here:

- ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` (environment): the kernels eager ATen
  dispatches to, and, while ``cpp.simdlen`` is unset, the ISA inductor's C++ code uses
  (``torch/_inductor/cpu_vec_isa.py`` in torch 2.13, ``pick_vec_isa``: ``default``
  means scalar code).
- ``--inductor-simdlen N`` (this option): sets ``torch._inductor.config.cpp.simdlen``
  before anything compiles. 256 is AVX2, 512 AVX-512; a width the CPU lacks (0, or 512
  on an AVX2-only CPU) gives scalar C++ kernels. Torch reads no environment variable for
  it; ``TORCHINDUCTOR_VEC_ISA_OK=0`` is the environment's way to scalar kernels.

Torch 2.13's inductor caches do not key on ``ATEN_CPU_CAPABILITY``: a kernel generated
with AVX2 and cached is later compiled without AVX2's flags and fails (``'at::vec' has
not been declared``). Give each variant its own ``TORCHINDUCTOR_CACHE_DIR``; README's
Development section has the commands.

The report header names the variant a run used, so a log says which one passed.
"""

from __future__ import annotations

import os

OPTION = "--inductor-simdlen"


def pytest_addoption(parser):
    parser.addoption(
        OPTION,
        type=int,
        default=None,
        metavar="N",
        help="set torch._inductor.config.cpp.simdlen to N (256: AVX2, 512: AVX-512, 0: scalar C++ kernels)",
    )


def pytest_configure(config):
    simdlen = config.getoption(OPTION)
    if simdlen is not None:
        import torch._inductor.config as inductor_config

        inductor_config.cpp.simdlen = simdlen


def describe() -> str:
    """One line: ATen's CPU capability and what inductor's C++ kernels will use."""
    import torch
    import torch._inductor.config as inductor_config

    parts = [
        f"ATen CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f" (ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', 'unset')})",
        f"inductor cpp.simdlen={inductor_config.cpp.simdlen}",
    ]
    if "TORCHINDUCTOR_VEC_ISA_OK" in os.environ:
        parts.append(f"TORCHINDUCTOR_VEC_ISA_OK={os.environ['TORCHINDUCTOR_VEC_ISA_OK']}")
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        parts.append(f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']}")
    return ", ".join(parts)


def inductor_isa() -> str:
    """The ISA inductor's C++ kernels use now ('scalar' for none); builds a probe once."""
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    isa = pick_vec_isa()
    return str(isa) if isa else "scalar"


def pytest_report_header(config):
    return describe()
