"""Tolerances for comparing our results with torch's, per dtype: the one table the suite uses.

They hold on any x86 CPU, not only this project's AMD EPYC (AVX2): an Intel Xeon with
AVX-512 rounds differently (other vector instructions, other fused multiply-adds), and
the old fp32 tolerance (rtol=1e-6, atol=1e-6) failed there once,
``test_realloc.py::test_model_to_channels_last``, one momentum buffer element off by
1.34e-6. That is rounding, not a bug: in that test torch's own fp32 momentum buffers are
up to 9.0e-7 from a float64 run (ours 3.5e-7; ``test_accuracy.py``), and for elements
near 0 (terms of size ~0.7 that cancel) no relative tolerance helps: the absolute one
has to cover the ulps of the terms, not of the result.

How torch's own tests choose them (torch 2.13 sources; test/ files from pytorch's
repository at that release):

- ``torch.testing.assert_close``'s defaults per dtype (``torch/testing/_comparison.py``):
  fp32 and complex64 rtol=1.3e-6, atol=1e-5; fp64 1e-7, 1e-7; fp16 1e-3, 1e-5; bf16
  1.6e-2, 1e-5. ``test/inductor/test_compiled_optimizers.py``'s ``check_optim`` compares
  the compiled ``torch.optim.RMSprop`` with the eager one in fp32 with exactly these (it
  overrides them only for Adadelta and NAdam, with the mismatch it saw). That is our
  case: a compiled RMSprop step against the eager one.
- ``torch/testing/_internal/common_optimizers.py`` raises fp16 and bf16 to rtol=atol=5e-3
  for ``test_fused_matches_forloop`` (Adam, AdamW, Adagrad, SGD): "the non-fused kernels
  have more dtype cast operations". Ours too: eager RMSprop rounds to fp16/bf16 after each
  op, our compiled kernel once per output.
- ``test/test_optim.py``'s ``test_mixed_device_dtype`` uses 5x the single-op defaults
  "as we are collating lots of ops together for optimizers"; we did not need that.

Where a comparison failed at torch's tolerance or was in doubt, ``against_fp64.py``
measured ours and torch against a float64 run (``tests/optimizer/test_accuracy.py``
keeps those checks): a difference both make equally is rounding, not a bug.
README's Development section has the commands that reproduce other CPUs' rounding here
(``ATEN_CPU_CAPABILITY``, inductor's ``cpp.simdlen``); every value below passed under
each of them with the margin noted (worst |ours - torch| / allowed, over the suite).
"""

from __future__ import annotations

import torch

#: dtype -> assert_close keywords (atol at unit scale: assert_close_at_scale). SOURCES says
#: where each value comes from.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.float32: dict(rtol=1.3e-6, atol=1e-5),
    torch.complex64: dict(rtol=1.3e-6, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=4e-2),
}

#: dtype -> which torch test the value follows, and why.
SOURCES: dict[torch.dtype, str] = {
    torch.float64: (
        "tighter than torch's default (1e-7, 1e-7; test_optim.py's test_foreach_matches_forloop runs "
        "in fp64 with it) on purpose: the fp64 runs are where this suite sees a slightly wrong "
        "formula (an lr off by 1e-6 relative moves params by 7e-7 in 20 steps, below fp32's "
        "tolerance), and fp64 rounding differs between CPUs by an ulp per op (worst use: 0.005 "
        "of the allowed difference, under every CPU variant)"
    ),
    torch.float32: (
        "torch.testing.assert_close's fp32 default, as test_compiled_optimizers.py's check_optim "
        "compares compiled and eager RMSprop"
    ),
    torch.complex64: "assert_close's complex64 default, as fp32 (the real and imaginary parts are fp32)",
    torch.float16: (
        "common_optimizers.py's override for test_fused_matches_forloop (fp16: atol=rtol=5e-3): "
        "eager rounds after each op, a fused kernel once per output (2 ulps seen at 1)"
    ),
    torch.bfloat16: (
        "rtol: assert_close's bf16 default (1.6e-2, 2 ulps); atol 4e-2: common_optimizers.py's "
        "5e-3 is 1 ulp for params below 1, ours reach 3 and momentum buffers 8, where elements "
        "cancelling to near 0 keep an ulp of those terms (measured 2.8e-2 needed; ours and "
        "torch's errors against fp64 are alike: test_accuracy.py)"
    ),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close keywords for comparing a result of ``dtype`` with torch's."""
    return TOLERANCES[torch.complex64 if dtype.is_complex else dtype]


def assert_close_at_scale(actual, expected, *, rtol: float, atol: float, **kwargs) -> None:
    """``torch.testing.assert_close`` with ``atol`` read at the scale of ``expected``.

    torch's atol is for values of order 1 (its optimizer tests compare params of that
    size). For a tensor whose largest element M is below 1, atol becomes ``atol * M``:
    a square_avg of 2e-5 is not compared with an atol half its size, while an element
    near 0 among elements of size M still gets ``atol * M`` for its cancelled ulps.
    Never looser than ``atol``.
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * min(1.0, scale), **kwargs)
