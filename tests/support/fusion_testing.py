"""Helpers for the foreach fusion pass tests: trace graphs cheaply and run them eagerly.

Imported by the test modules as ``fusion_testing`` (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import collections
import operator

import torch
from torch._inductor.decomposition import select_decomp_table
from torch.fx.experimental.proxy_tensor import make_fx

#: Foreach ops one foreach addcmul/addcdiv adds in inductor's graphs beyond itself: 1 on
#: torch 2.11, whose inductor decomposition table splits each into two foreach ops
#: (``_foreach_mul``/``_foreach_div`` then ``_foreach_add``); 0 on 2.12 and 2.13.
INDUCTOR_COMPOSITE_SPLIT = int(torch.ops.aten._foreach_addcmul.Scalar in select_decomp_table())


def trace(fn, *args) -> torch.fx.GraphModule:
    """``make_fx`` with FakeTensors: aten ops as called, ``meta["val"]`` on every node."""
    return make_fx(fn, tracing_mode="fake")(*args)


def capture_aot(fn, *args, decompositions=None) -> torch.fx.GraphModule:
    """The post-AOT inference graph Dynamo + AOT autograd build for ``fn`` (no codegen).

    ``decompositions=None`` is torchair's view (no decompositions); pass inductor's table
    (``select_decomp_table()``) for what inductor's post-grad passes see.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    graphs = []

    def backend(gm, example_inputs):
        def record(g, _inputs):
            graphs.append(g)
            return g

        return aot_module_simplified(
            gm,
            example_inputs,
            fw_compiler=record,
            decompositions=decompositions or {},
            keep_inference_input_mutations=True,
        )

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*clone_all(args))
    torch._dynamo.reset()
    (gm,) = graphs
    return gm


def clone_all(args):
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def run(gm: torch.fx.GraphModule, args) -> list[torch.Tensor]:
    """Runs ``gm`` eagerly on copies of ``args``; returns its outputs, then the inputs after."""
    inputs = clone_all(args)
    with torch.no_grad():
        outs = gm(*inputs)
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    return [o for o in outs if isinstance(o, torch.Tensor)] + inputs


def assert_same(ref_gm, gm, args, *, exact=True, rtol=None, atol=None) -> None:
    """Both graphs give the same outputs and the same mutated inputs."""
    expected, actual = run(ref_gm, args), run(gm, args)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.dtype == a.dtype and e.shape == a.shape
        if exact:
            assert torch.equal(e, a), (e - a).abs().max()
        else:
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol)


def targets(gm: torch.fx.GraphModule) -> collections.Counter:
    """How often each ``call_function`` target occurs (``getitem`` left out)."""
    return collections.Counter(
        n.target for n in gm.graph.nodes if n.op == "call_function" and n.target is not operator.getitem
    )


def foreach_count(gm: torch.fx.GraphModule) -> int:
    return sum(c for t, c in targets(gm).items() if getattr(t, "__name__", "").startswith("_foreach_"))



def rmsprop_over_views(P, G, S, lr, *, sizes, shapes=None, alpha=0.99, eps=1e-8):
    """RMSprop's step as users write it over per-parameter views of flat buffers:
    functional foreach ops over ``split`` views, one ``cat`` + ``copy_`` per buffer."""

    def pieces(flat):
        parts = flat.split(sizes)
        return [p.view(s) for p, s in zip(parts, shapes)] if shapes else list(parts)

    def flat(parts):
        return torch.cat([p.reshape(-1) for p in parts]) if shapes else torch.cat(parts)

    ps, gs, ss = pieces(P), pieces(G), pieces(S)
    ss = torch._foreach_mul(ss, alpha)
    ss = torch._foreach_addcmul(ss, gs, gs, value=1 - alpha)
    avg = torch._foreach_sqrt(ss)
    avg = torch._foreach_add(avg, eps)
    upd = torch._foreach_div(gs, avg)
    upd = torch._foreach_mul(upd, lr)
    ps = torch._foreach_sub(ps, upd)
    P.copy_(flat(ps))
    S.copy_(flat(ss))


def flat_buffers(sizes, dtype=torch.float32, seed=0):
    """(P, G, S, lr) for ``sum(sizes)`` elements; S is positive, lr a 0-d fp32 tensor."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    P = torch.randn(n, generator=g).to(dtype)
    G = torch.randn(n, generator=g).to(dtype)
    S = torch.rand(n, generator=g).to(dtype)
    return [P, G, S, torch.tensor(0.01)]
