"""rmsprop_step against torch's own functional RMSprop, numbers and 0-d tensors."""

from __future__ import annotations

import pytest
import torch
from torch.optim.rmsprop import rmsprop as torch_rmsprop

from npu_optim_compile import rmsprop_step

OPTIONS = [
    dict(weight_decay=0.0, momentum=0.0, centered=False, maximize=False),
    dict(weight_decay=0.1, momentum=0.0, centered=True, maximize=False),
    dict(weight_decay=0.1, momentum=0.9, centered=True, maximize=True),
    dict(weight_decay=0.0, momentum=0.5, centered=False, maximize=True),
]


def buffers(dtype, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (5,), ()]
    mk = lambda: [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes[:n]]  # noqa: E731
    params, grads = mk(), mk()
    sq = [torch.rand(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes[:n]]
    ga, mb = [x * 0.1 for x in mk()], mk()
    return params, grads, sq, ga, mb


@pytest.mark.parametrize("as_tensors", [False, True], ids=["numbers", "tensors"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_torch_functional_fp64(options, as_tensors):
    ours = buffers(torch.float64)
    ref = [[t.clone() for t in lst] for lst in ours]
    hp = dict(lr=0.03, alpha=0.9, eps=1e-3, weight_decay=options["weight_decay"], momentum=options["momentum"])
    ours_hp = {k: torch.tensor(v, dtype=torch.float64) for k, v in hp.items()} if as_tensors else hp
    if as_tensors and hp["weight_decay"] == 0:
        ours_hp["weight_decay"] = 0  # a tensor weight decay always applies; 0 as a number skips
    use_mom = options["momentum"] > 0
    for _ in range(5):
        rmsprop_step(ours[0], ours[1], ours[2], ours[3], ours[4] if use_mom else None,
                     centered=options["centered"], maximize=options["maximize"], **ours_hp)
        torch_rmsprop(ref[0], ref[1], ref[2], ref[3], ref[4] if use_mom else [],
                      [torch.tensor(0.0)] * 3, foreach=False, centered=options["centered"],
                      maximize=options["maximize"], **hp)
    for a, b in zip(ours, ref):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)


def test_grads_are_not_modified():
    params, grads, sq, ga, mb = buffers(torch.float32)
    before = [g.clone() for g in grads]
    rmsprop_step(params, grads, sq, ga, mb, lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0.5,
                 momentum=0.9, centered=True, maximize=True)
    for g, b in zip(grads, before):
        assert torch.equal(g, b)


def test_complex_matches_view_as_real():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(4, dtype=torch.complex128, generator=g)
    grad = torch.randn(4, dtype=torch.complex128, generator=g)
    v = torch.zeros(4, dtype=torch.complex128)
    p_real, v_real = torch.view_as_real(p.clone()).clone(), torch.zeros(4, 2, dtype=torch.float64)
    kw = dict(lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0, momentum=0, centered=False, maximize=False)
    rmsprop_step([p], [grad], [v], None, None, **kw)
    rmsprop_step([p_real], [torch.view_as_real(grad)], [v_real], None, None, **kw)
    torch.testing.assert_close(torch.view_as_real(p), p_real, rtol=0, atol=0)


def test_empty_lists_are_a_no_op():
    assert rmsprop_step([], [], [], None, None, lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0,
                        momentum=0, centered=False, maximize=False) is None


@pytest.mark.parametrize(
    "lists, message",
    [
        (dict(grads=1), "same length"),
        (dict(grad_avgs=1), "centered=True needs 2 grad_avgs"),
        (dict(momentum_buffers=1), "expected 2 momentum_buffers"),
    ],
)
def test_length_mismatch_errors(lists, message):
    args = {k: [torch.zeros(2), torch.zeros(2)] for k in ("params", "grads", "square_avgs", "grad_avgs", "momentum_buffers")}
    for key, n in lists.items():
        args[key] = args[key][:n]
    with pytest.raises(ValueError, match=message):
        rmsprop_step(**args, lr=0.1, alpha=0.9, eps=1e-8, weight_decay=0, momentum=0.9,
                     centered=True, maximize=False)
