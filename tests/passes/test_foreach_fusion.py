"""The pass core on traced graphs: what it collapses, lowers, leaves alone, and that the
rewritten graph computes what the original does."""

from __future__ import annotations

import copy
import functools
import logging
import operator

import pytest
import torch
from torch._inductor.decomposition import select_decomp_table

from fusion_testing import (
    assert_same,
    capture_aot,
    INDUCTOR_COMPOSITE_SPLIT,
    flat_buffers,
    foreach_count,
    rmsprop_over_views,
    targets,
    trace,
)
from npu_optim_compile.passes import EMITTED_OPS, FusionOptions, fuse_foreach_ops, torchair_foreach_fusion

aten = torch.ops.aten
SIZES_200 = [3, 17, 64, 1, 250] * 40

# The rewritten RMSprop step: seven pointwise ops on the flat buffers (addcmul is three),
# the write-backs, and nothing else.  ``neg`` appears where the step negates lr itself.
RMSPROP_FLAT = {
    aten.mul.Tensor: 4,  # S*alpha, G*(1-alpha), (..)*G, (G/avg)*lr
    aten.add.Tensor: 2,  # S + ..., sqrt + eps
    aten.sqrt.default: 1,
    aten.div.Tensor: 1,
    aten.sub.Tensor: 1,  # P - upd
}


def _fused(gm, **options):
    stats = fuse_foreach_ops(gm.graph, options=FusionOptions(**options))
    gm.recompile()
    return stats


def _no_splits_or_cats(gm):
    found = set(targets(gm)) & {aten.split_with_sizes.default, aten.split.Tensor, aten.cat.default}
    return not found


def test_rmsprop_over_200_split_views_collapses_to_flat_ops():
    args = flat_buffers(SIZES_200)
    fn = functools.partial(rmsprop_over_views, sizes=SIZES_200)
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert (stats.foreach_before, stats.foreach_fused, stats.cats_collapsed) == (7, 7, 2)
    assert stats.foreach_after == 0 and stats.pieces_materialized == 0
    pointwise = {t: c for t, c in targets(gm).items() if t is not aten.copy_.default}
    assert pointwise == RMSPROP_FLAT
    assert targets(gm)[aten.copy_.default] == 2
    assert stats.ops_after == sum(RMSPROP_FLAT.values()) + 2 < stats.ops_before
    # addcmul's CPU kernel uses an FMA: only allclose (see test_lowering.ONLY_ALLCLOSE).
    assert_same(ref, gm, args, exact=False)


def _exact_chain(P, G, S, lr, *, sizes):
    """An RMSprop-like chain without FMA-rounded composites (bit-exact after fusion)."""
    ps, gs, ss = P.split(sizes), G.split(sizes), S.split(sizes)
    ss = torch._foreach_mul(ss, 0.99)
    ss = torch._foreach_add(ss, torch._foreach_mul(torch._foreach_mul(gs, 0.01), gs))
    avg = torch._foreach_add(torch._foreach_sqrt(ss), 1e-8)
    upd = torch._foreach_mul(torch._foreach_div(gs, avg), lr)
    P.copy_(torch.cat(torch._foreach_sub(ps, upd)))
    S.copy_(torch.cat(ss))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_flat_chain_is_bit_exact(dtype):
    sizes = [3, 17, 64, 1, 250] * 4
    args = flat_buffers(sizes, dtype)
    fn = functools.partial(_exact_chain, sizes=sizes)
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.foreach_fused == 9 and stats.foreach_after == 0 and _no_splits_or_cats(gm)
    assert_same(ref, gm, args)


@pytest.mark.parametrize("decompositions", [None, "inductor"], ids=["torchair", "inductor"])
def test_post_aot_graph_collapses(decompositions):
    sizes = [3, 17, 64, 1, 250] * 4
    args = flat_buffers(sizes)
    fn = functools.partial(rmsprop_over_views, sizes=sizes)
    table = select_decomp_table() if decompositions else None
    gm = capture_aot(fn, *args, decompositions=table)
    ref = copy.deepcopy(gm)
    stats = _fused(gm, target="inductor" if decompositions else "torchair")
    expected = 7 + (INDUCTOR_COMPOSITE_SPLIT if decompositions else 0)  # addcmul split on torch 2.11
    assert stats.foreach_fused == expected and stats.cats_collapsed == 2 and stats.foreach_after == 0
    assert _no_splits_or_cats(gm)
    assert stats.ops_after <= sum(RMSPROP_FLAT.values()) + 5  # + neg(lr), copy, copy_ x2
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert isinstance(node.meta.get("val"), torch.Tensor), node.format_node()
    assert_same(ref, gm, args, exact=False)


def test_reshaped_pieces_collapse():
    shapes = [(3, 4), (5,), (2, 3, 2), (1, 1)] * 5
    sizes = [torch.Size(s).numel() for s in shapes]
    args = flat_buffers(sizes)
    fn = functools.partial(rmsprop_over_views, sizes=sizes, shapes=shapes)
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.foreach_fused == 7 and stats.cats_collapsed == 2 and _no_splits_or_cats(gm)
    assert aten.view.default not in targets(gm)
    assert_same(ref, gm, args, exact=False)


def test_split_tensor_of_a_2d_base_along_dim_1_collapses():
    def fn(A, B):
        xs, ys = A.split(2, dim=1), B.split(2, dim=1)  # split.Tensor: widths 2, 2, 1
        return torch.cat(torch._foreach_div(torch._foreach_add(xs, ys, alpha=3), 7.0), dim=1)

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)]
    ref, gm = trace(fn, *args), trace(fn, *args)
    assert aten.split.Tensor in targets(gm)
    stats = _fused(gm)
    assert (stats.foreach_fused, stats.cats_collapsed) == (2, 1) and _no_splits_or_cats(gm)
    assert_same(ref, gm, args)


def test_pieces_other_consumers_need_are_materialized_once():
    sizes = [4, 6, 5]

    def fn(P, G):
        out = torch._foreach_mul(torch._foreach_add(P.split(sizes), G.split(sizes)), 2.0)
        return torch.cat(out), out[1].sum(), out[2].view(5, 1)

    args = flat_buffers(sizes)[:2]
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.foreach_fused == 2 and stats.cats_collapsed == 1
    assert stats.pieces_materialized == 2
    assert targets(gm)[aten.split_with_sizes.default] == 1  # of the flat result, not the inputs
    assert_same(ref, gm, args)


def test_unrelated_tensors_are_lowered_per_tensor():
    shapes = [(3, 4), (7,), (2, 2), (5,)]
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g) for s in shapes]
    gs = [torch.randn(s, generator=g) for s in shapes]

    def fn(*ts):
        p, g = list(ts[:4]), list(ts[4:])
        new = torch._foreach_sub(p, torch._foreach_div(g, torch._foreach_add(torch._foreach_abs(g), 1.0)))
        for old, n in zip(p, new):
            old.copy_(n)

    args = ps + gs
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.foreach_lowered == 4 and stats.foreach_fused == 0 and foreach_count(gm) == 0
    assert targets(gm)[aten.abs.default] == 4 and targets(gm)[aten.sub.Tensor] == 4
    assert_same(ref, gm, args)


def test_single_element_lists_become_plain_aten_ops():
    def fn(P, G, S, lr):  # the optimizer's flat-buffer call: one tensor per list
        rmsprop_over_views(P, G, S, lr, sizes=[P.numel()])

    args = flat_buffers([300])

    def step(P, G, S, lr):
        ss = torch._foreach_mul([S], 0.99)
        ss = torch._foreach_addcmul(ss, [G], [G], value=0.01)
        avg = torch._foreach_add(torch._foreach_sqrt(ss), 1e-8)
        new = torch._foreach_sub([P], torch._foreach_mul(torch._foreach_div([G], avg), lr))
        P.copy_(new[0])
        S.copy_(ss[0])

    for f in (fn, step):
        ref, gm = trace(f, *args), trace(f, *args)
        stats = _fused(gm)
        assert stats.foreach_after == 0 and stats.foreach_rewritten == 7
        assert {t: c for t, c in targets(gm).items() if t is not aten.copy_.default} == RMSPROP_FLAT
        assert set(targets(gm)) <= EMITTED_OPS | {aten.copy_.default}
        assert_same(ref, gm, args, exact=False)


def test_scalar_lists_are_never_miscomputed():
    sizes = [4, 6, 5]

    def fn(P, G):
        ps, gs = P.split(sizes), G.split(sizes)
        a = torch._foreach_mul(ps, [0.5, 0.25, 2.0])  # differs per tensor: per-tensor ops
        b = torch._foreach_add(gs, [3.0, 3.0, 3.0])  # all equal: one flat op
        c = torch._foreach_addcdiv(a, b, gs, [1.0, -1.0, 0.5])
        return torch.cat(c)

    args = flat_buffers(sizes)[:2]
    args[1] = args[1].abs() + 0.5
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert (stats.foreach_fused, stats.foreach_lowered) == (1, 2)
    assert targets(gm)[aten.mul.Tensor] == 3 + 2  # a per tensor; addcdiv's value (1.0 skipped)
    assert_same(ref, gm, args)


@pytest.mark.parametrize(
    "pick",
    [
        lambda ps, qs: ps[:2],  # a piece missing
        lambda ps, qs: [ps[1], ps[0], ps[2]],  # out of order
        lambda ps, qs: [ps[0], qs[1], ps[2]],  # two buffers
    ],
    ids=["incomplete", "disordered", "mixed"],
)
def test_partial_tilings_are_not_collapsed(pick):
    sizes = [4, 4, 4]

    def fn(P, Q):
        xs = pick(P.split(sizes), Q.split(sizes))
        return torch.cat(torch._foreach_sqrt(torch._foreach_abs(xs)))

    args = flat_buffers(sizes)[:2]
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.foreach_fused == 0 and stats.foreach_lowered == 2 and stats.cats_collapsed == 0
    assert_same(ref, gm, args)


def test_cat_of_input_pieces_is_a_copy_not_an_alias():
    sizes = [2, 3]

    def fn(P):
        whole = torch.cat(P.split(sizes))
        P.mul_(2.0)  # a later mutation of the input must not show through
        return whole

    args = flat_buffers(sizes)[:1]
    ref, gm = trace(fn, *args), trace(fn, *args)
    stats = _fused(gm)
    assert stats.cats_collapsed == 1 and targets(gm)[aten.clone.default] == 1
    assert_same(ref, gm, args)


def test_graphs_it_cannot_improve_are_left_unchanged(caplog):
    sizes = [4, 4]

    def no_foreach(P):
        return torch.sin(P) + 1

    def unsupported(P):  # no lowering for exp, and a weight list for lerp
        ps = P.split(sizes)
        return torch.cat(torch._foreach_lerp(torch._foreach_exp(ps), ps, list(ps)))

    args = flat_buffers(sizes)[:1]
    for fn in (no_foreach, unsupported):
        gm = trace(fn, *args)
        before = gm.code
        with caplog.at_level(logging.DEBUG, logger="npu_optim_compile.passes"):
            stats = _fused(gm)
        gm.graph.lint()
        assert gm.code == before and not stats.changed
        assert stats.ops_after == stats.ops_before
    assert stats.rejected == {
        "no lowering for aten._foreach_exp.default": 1,
        "no lowering for aten._foreach_lerp.List": 1,
    }
    assert "no lowering for aten._foreach_exp.default" in caplog.text


def test_options_switch_parts_off():
    sizes = [4, 4]
    args = flat_buffers(sizes)
    fn = functools.partial(rmsprop_over_views, sizes=sizes)

    gm = trace(fn, *args)
    before = gm.code
    stats = _fused(gm, enabled=False)
    assert gm.code == before and not stats.enabled and stats.foreach_after == 7

    gm = trace(fn, *args)
    stats = _fused(gm, collapse_tilings=False)
    assert (stats.foreach_fused, stats.foreach_lowered, stats.cats_collapsed) == (0, 7, 0)

    gm = trace(fn, *args)
    stats = _fused(gm, lower_per_tensor=False, collapse_tilings=False)
    assert gm.code == before and stats.rejected == {"not a tiling and per-tensor lowering is off": 7}

    with pytest.raises(ValueError, match="target must be one of"):
        FusionOptions(target="npu")


# Overloads with a working GE converter in torch_npu 2.13.0 (passes/ge_allowlist.json) that a fusion pass may emit.
GE_CONVERTIBLE = {
    aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
    aten.div.Tensor, aten.div.Scalar, aten.sqrt.default, aten.rsqrt.default,
    aten.neg.default, aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.where.self,
    aten.copy_.default, aten.cat.default, aten.split_with_sizes.default, aten.split.Tensor,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.slice.Tensor,
    aten.full.default, aten.full_like.default, aten.clone.default, aten._to_copy.default,
    aten.maximum.default, aten.abs.default,
}  # fmt: skip


def test_emitted_ops_have_ge_converters():
    assert EMITTED_OPS <= GE_CONVERTIBLE
    assert aten.sub.Scalar not in EMITTED_OPS


def test_torchair_adapter_rewrites_gm_in_place():
    sizes = [3, 17, 64]
    args = flat_buffers(sizes)
    fn = functools.partial(rmsprop_over_views, sizes=sizes)
    gm = capture_aot(fn, *args)
    ref = copy.deepcopy(gm)
    fake_inputs = [n.meta["val"] for n in gm.graph.nodes if n.op == "placeholder"]
    graph = gm.graph
    torchair_foreach_fusion(gm, fake_inputs, object())
    assert gm.graph is graph and foreach_count(gm) == 0
    assert "_foreach_" not in gm.code  # recompiled
    assert set(targets(gm)) <= EMITTED_OPS | {aten.copy_.default, aten.copy.default, aten.neg.default}
    assert_same(ref, gm, args, exact=False)
    assert not any(n.target is operator.getitem for n in gm.graph.nodes)
