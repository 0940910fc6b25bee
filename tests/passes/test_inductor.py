"""Real inductor compiles (CPU, kept small) with the pass installed per compile."""

from __future__ import annotations

import functools

import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache

from fusion_testing import INDUCTOR_COMPOSITE_SPLIT, clone_all, flat_buffers, rmsprop_over_views
from npu_optim_compile.passes import ForeachFusionPass, FusionOptions


def _compile_and_run(fn, args, fusion_pass):
    torch._dynamo.reset()
    counters.clear()
    inputs = clone_all(args)
    with fresh_cache(), torch.no_grad():
        compiled = torch.compile(fn, fullgraph=True, options={"post_grad_custom_pre_pass": fusion_pass})
        out = compiled(*inputs)
    torch._dynamo.reset()
    return out, inputs


def test_flat_rmsprop_compiles_with_the_pass_and_keeps_the_cache():
    sizes = [3, 17, 64, 1, 250] * 2
    args = flat_buffers(sizes)
    fn = functools.partial(rmsprop_over_views, sizes=sizes)
    fusion = ForeachFusionPass()
    _, compiled = _compile_and_run(fn, args, fusion)
    expected = clone_all(args)
    with torch.no_grad():
        fn(*expected)
    for c, e in zip(compiled, expected):
        torch.testing.assert_close(c, e)
    (stats,) = fusion.history
    # seven foreach ops, one more where inductor splits addcmul (torch 2.11)
    assert (stats.foreach_fused, stats.cats_collapsed, stats.foreach_after) == (7 + INDUCTOR_COMPOSITE_SPLIT, 2, 0)
    assert counters["inductor"]["fxgraph_cache_bypass"] == 0  # uuid() keeps the cache on
    assert counters["inductor"]["fxgraph_cache_miss"] == 1


def test_per_tensor_bf16_composites_compile():
    shapes = [(3, 4), (7,), (1,)]
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    ds = [torch.rand(s, generator=g).bfloat16() + 0.5 for s in shapes]

    def fn(*xs):  # unrelated tensors and a one-tensor list; casts via convert_element_type
        a, d = list(xs[:3]), list(xs[3:])
        out = torch._foreach_addcdiv(a, a, d, value=-0.5)
        return out + torch._foreach_sqrt([d[0]])

    args = ts + ds
    fusion = ForeachFusionPass()
    out, _ = _compile_and_run(fn, args, fusion)
    with torch.no_grad():
        expected = fn(*args)
    for o, e in zip(out, expected):
        torch.testing.assert_close(o, e)
    (stats,) = fusion.history
    assert stats.foreach_lowered == 2 + INDUCTOR_COMPOSITE_SPLIT and stats.foreach_after == 0


def test_uuid_is_stable_and_keyed_on_options():
    a, b = ForeachFusionPass(), ForeachFusionPass(FusionOptions())
    assert a.uuid() == b.uuid() and isinstance(a.uuid(), str) and a.uuid()
    assert ForeachFusionPass(FusionOptions(collapse_tilings=False)).uuid() != a.uuid()
    assert ForeachFusionPass(FusionOptions(enabled=False)).uuid() != a.uuid()
    # the adapter always emits for inductor, whatever target the options name
    torchair_options = ForeachFusionPass(FusionOptions(target="torchair"))
    assert torchair_options.options.target == "inductor" and torchair_options.uuid() == a.uuid()



def test_composites_compile_bit_for_bit_as_without_the_pass():
    g = torch.Generator().manual_seed(0)
    s, t1 = torch.randn(1003, generator=g), torch.randn(1003, generator=g)
    t2 = torch.rand(1003, generator=g) + 0.5

    def fn(s, t1, t2):  # one-tensor lists, as the optimizer's flat buffers give
        return (
            torch._foreach_addcmul([s], [t1], [t2], value=0.0100000009)[0],
            torch._foreach_addcdiv([s], [t1], [t2], value=-0.37)[0],
            torch._foreach_lerp([s], [t1], 0.3)[0],
            torch._foreach_lerp([s], [t1], 0.8)[0],
        )

    fusion = ForeachFusionPass()
    with_pass, _ = _compile_and_run(fn, [s, t1, t2], fusion)
    without, _ = _compile_and_run(fn, [s, t1, t2], None)
    (stats,) = fusion.history  # inductor decomposes foreach lerp into several foreach ops
    assert stats.foreach_after == 0 and stats.foreach_lowered >= 4
    for a, b in zip(with_pass, without):
        assert torch.equal(a, b)
