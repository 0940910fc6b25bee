"""Every supported foreach overload, lowered per tensor and fused on a flat buffer,
computes what the unfused graph computes (both run eagerly on the CPU): bit for bit,
except the cases in ``ONLY_ALLCLOSE``, each with its reason."""

from __future__ import annotations

import pytest
import torch

from fusion_testing import assert_same, foreach_count, run, targets, trace
from npu_optim_compile.passes import EMITTED_OPS, INDUCTOR_EMITTED_OPS, FusionOptions, fuse_foreach_ops

SIZES = [5, 17, 300, 1, 33]  # odd sizes: pieces start and end inside vector lanes

# name -> op(xs, ys, zs, t) on lists xs (positive), ys (any sign), zs (in [0.5, 1.5)), t 0-d.
CASES = {
    "add.List": lambda x, y, z, t: torch._foreach_add(x, y),
    "add.List alpha": lambda x, y, z, t: torch._foreach_add(x, y, alpha=-0.37),
    "add.Scalar": lambda x, y, z, t: torch._foreach_add(x, 0.3),
    "add.Tensor alpha": lambda x, y, z, t: torch._foreach_add(x, t, alpha=2.5),
    "sub.List alpha": lambda x, y, z, t: torch._foreach_sub(x, y, alpha=0.7),
    "sub.Scalar": lambda x, y, z, t: torch._foreach_sub(x, 1.3),
    "mul.List": lambda x, y, z, t: torch._foreach_mul(x, y),
    "mul.Scalar": lambda x, y, z, t: torch._foreach_mul(x, 0.99),
    "mul.Tensor": lambda x, y, z, t: torch._foreach_mul(x, t),
    "mul.ScalarList equal": lambda x, y, z, t: torch._foreach_mul(x, [0.1] * len(x)),
    "div.List": lambda x, y, z, t: torch._foreach_div(y, z),
    "div.Scalar": lambda x, y, z, t: torch._foreach_div(y, 3.0),
    "div.Tensor": lambda x, y, z, t: torch._foreach_div(y, t),
    "sqrt": lambda x, y, z, t: torch._foreach_sqrt(x),
    "rsqrt": lambda x, y, z, t: torch._foreach_rsqrt(x),
    "neg": lambda x, y, z, t: torch._foreach_neg(y),
    "reciprocal": lambda x, y, z, t: torch._foreach_reciprocal(z),
    "abs": lambda x, y, z, t: torch._foreach_abs(y),
    "maximum.List": lambda x, y, z, t: torch._foreach_maximum(y, z),
    "pow.Scalar": lambda x, y, z, t: torch._foreach_pow(x, 0.5),
    "addcmul": lambda x, y, z, t: torch._foreach_addcmul(x, y, z, value=0.01),
    "addcmul value=1": lambda x, y, z, t: torch._foreach_addcmul(x, y, z),
    "addcdiv": lambda x, y, z, t: torch._foreach_addcdiv(x, y, z, value=-0.01),
    "lerp small weight": lambda x, y, z, t: torch._foreach_lerp(x, y, 0.3),
    "lerp large weight": lambda x, y, z, t: torch._foreach_lerp(x, y, 0.9),
    "mul.ScalarList": lambda x, y, z, t: torch._foreach_mul(x, [0.1 * (i + 1) for i in range(len(x))]),
    "addcdiv.ScalarList": lambda x, y, z, t: torch._foreach_addcdiv(x, y, z, [-0.1 * (i + 1) for i in range(len(x))]),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _inputs(dtype):
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    x = (torch.rand(n, generator=g) + 0.1).to(dtype)
    y = torch.randn(n, generator=g).to(dtype)
    z = (torch.rand(n, generator=g) + 0.5).to(dtype)
    t = torch.tensor(0.37)  # fp32 0-d, as an lr tensor is
    return x, y, z, t


def _tiled(op):
    def fn(x, y, z, t):
        return torch.cat(op(x.split(SIZES), y.split(SIZES), z.split(SIZES), t))

    return fn


def _unrelated(op):
    k = len(SIZES)

    def fn(*flat):
        return op(list(flat[:k]), list(flat[k : 2 * k]), list(flat[2 * k : 3 * k]), flat[-1])

    return fn


def _split_args(x, y, z, t):
    return [*x.split(SIZES), *y.split(SIZES), *z.split(SIZES), t]


# (case, dtype, path) that are only allclose, with why.  Eager CPU kernels round
# differently from any sequence of separate aten ops:
_FMA = {  # vectorised kernels use a fused multiply-add (one rounding)
    (case, dtype, path)
    for case in ("addcmul", "addcmul value=1", "lerp small weight", "lerp large weight")
    for dtype in (torch.float32, torch.float64, torch.float16)
    for path in ("flat", "per_tensor")
}
_TAIL = {  # reduced-precision kernels round the vector body and the scalar tail differently
    # (the tail rounds alpha*y to bf16 before adding), so an element's bits depend on where
    # it sits in its tensor: pieces != flat buffer, by up to one ulp of the addend
    (case, dtype, "flat")
    for case in ("add.List alpha", "add.Tensor alpha", "sub.List alpha", "rsqrt")
    for dtype in (torch.bfloat16, torch.float16)
}
ONLY_ALLCLOSE = _FMA | _TAIL


def _all_cases(xs, ys, zs, t):
    return [r for op in CASES.values() for r in op(xs, ys, zs, t)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["flat", "per_tensor"])
def test_lowering_matches_unfused(dtype, path):
    if path == "flat":
        args = list(_inputs(dtype))
        fn = lambda x, y, z, t: _all_cases(x.split(SIZES), y.split(SIZES), z.split(SIZES), t)
    else:
        args = _split_args(*_inputs(dtype))
        fn = _unrelated(_all_cases)
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = fuse_foreach_ops(gm.graph)
    gm.recompile()
    assert stats.foreach_before == len(CASES) and foreach_count(gm) == 0
    assert set(targets(gm)) <= EMITTED_OPS
    expected, actual = run(ref, args), run(gm, args)
    k = len(SIZES)
    inexact = set()
    for i, case in enumerate(CASES):
        for e, a in zip(expected[i * k : (i + 1) * k], actual[i * k : (i + 1) * k]):
            assert e.dtype == a.dtype and e.shape == a.shape, case
            if not torch.equal(e, a):
                inexact.add((case, dtype, path))
                tol = {"atol": 1e-2, "rtol": 1.6e-2} if (case, dtype, path) in _TAIL else {}
                torch.testing.assert_close(a, e, msg=case, **tol)
    assert inexact <= ONLY_ALLCLOSE


@pytest.mark.parametrize("target", ["torchair", "inductor"])
def test_reduced_precision_composites_cast_through_fp32(target):
    args = list(_inputs(torch.bfloat16))
    fn = _tiled(CASES["addcdiv"])
    ref, gm = trace(fn, *args), trace(fn, *args)
    fuse_foreach_ops(gm.graph, options=FusionOptions(target=target))
    gm.recompile()
    allowed = EMITTED_OPS if target == "torchair" else INDUCTOR_EMITTED_OPS
    cast = torch.ops.aten._to_copy.default if target == "torchair" else torch.ops.prims.convert_element_type.default
    assert set(targets(gm)) <= allowed
    assert targets(gm)[cast] == 4  # three inputs up, the result down
    assert_same(ref, gm, args)
