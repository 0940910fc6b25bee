"""The option registry enforces itself: every field of RMSpropOptions reaches both paths.

The per-tensor path (``rmsprop_step`` with ``options.step_kwargs()``, what loose params
run) and the bucket path (``_bucket_step._make_python_step``: flags from
``options.structure()``, values from the hyper tensor) must give the same result for
every option, and a value off the default must change it. A field without a row in
:data:`OPTION_CASES` fails the first test; a synthetic field added to a subclass must
appear in every list derived from the registry.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import pytest
import torch

from npu_optim_compile import NpuFusedRMSprop, RMSpropOptions, rmsprop_init, rmsprop_step, rmsprop_update
from npu_optim_compile import _bucket_step
from npu_optim_compile.options import INITIAL_STATE, NO_NEUTRAL, STRUCTURE, VALUE, Scalar, _option

STEPS = 4
#: Every run: a large eps (what tells eps inside the root from outside).
BASE = dict(eps=1e-3)

#: For every option: the values off its default to try, and the options it needs to
#: have an effect.
OPTION_CASES = {
    "lr": ([0.05], {}),
    "alpha": ([0.5], {}),
    "eps": ([0.1], {}),
    "weight_decay": ([0.1], {}),
    "momentum": ([0.9], {}),
    "centered": ([True], {}),
    "maximize": ([True], {}),
    "eps_in_sqrt": ([True], {}),
    "initial_square_avg": ([1.0], {}),
    "lr_in_momentum": ([True], {"momentum": 0.9}),
    "decoupled_weight_decay": ([True], {"weight_decay": 0.1}),
    "lr_scaled_decay": ([False], {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    "nesterov": ([True], {"momentum": 0.9}),
    "bias_correction": ([True], {}),
    "loss_scale": ([4.0], {}),
    "caution": ([True], {"momentum": 0.9}),
    "corrected_weight_decay": ([True], {"weight_decay": 0.1, "decoupled_weight_decay": True, "max_lr": 0.02}),
    "max_lr": ([0.05], {"weight_decay": 0.1, "decoupled_weight_decay": True, "corrected_weight_decay": True,
                        "max_lr": 0.02}),
    "op_order": (["tf", "optax"], {"centered": True, "momentum": 0.9, "lr_in_momentum": True}),
}

CASES = [(name, value) for name, (values, _) in OPTION_CASES.items() for value in values]


def test_every_option_has_a_row():
    assert sorted(OPTION_CASES) == sorted(RMSpropOptions.names())
    for name, (values, _) in OPTION_CASES.items():
        assert all(v != RMSpropOptions.defaults()[name] for v in values), name


def run_both_paths(options: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One group: a dense param (in the flat bucket: the bucket path) and the same values
    as a non-dense view (a loose param: the per-tensor path), the same grads, an lr that
    changes every step (what tells lr in momentum from lr outside). Float64."""
    g = torch.Generator().manual_seed(0)
    start = torch.randn(4, 3, generator=g, dtype=torch.float64)
    dense = torch.nn.Parameter(start.clone())
    base = torch.zeros(4, 6, dtype=torch.float64)
    base[:, ::2] = start
    loose = torch.nn.Parameter(base[:, ::2])
    opt = NpuFusedRMSprop([dense, loose], backend="eager", **options)
    for step in range(STEPS):
        grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
        dense.grad, loose.grad = grad.clone(), grad.clone()
        opt.param_groups[0]["lr"] = opt.defaults["lr"] * (1 + 0.5 * math.sin(step))
        opt.step()
    plan = opt._engine.plans()[0]
    assert [b.params for b in plan.buckets] == [[dense]] and plan.loose == [loose]
    roles = ("square_avg", "grad_avg", "momentum_buffer")
    per_path = [[p.detach().clone()] + [opt.state[p][r].clone() for r in roles if r in opt.state[p]]
                for p in (dense, loose)]
    return per_path[0], per_path[1]


@pytest.mark.parametrize("name, value", CASES, ids=[f"{n}={v}" for n, v in CASES])
def test_every_option_reaches_both_paths(name, value):
    """The option changes the result (params and state) on both paths, identically."""
    _, needs = OPTION_CASES[name]
    base_bucket, base_loose = run_both_paths({**BASE, **needs})
    bucket, loose = run_both_paths({**BASE, **needs, name: value})
    for a, b in zip(bucket, loose):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(bucket[0], base_bucket[0]), f"{name}={value!r} does nothing on the bucket path"
    assert not torch.equal(loose[0], base_loose[0]), f"{name}={value!r} does nothing on the per-tensor path"


def test_pure_api_takes_every_option():
    """rmsprop_update accepts every option but the initial state (rmsprop_init's), and
    each value off its default changes its result."""
    params = {"w": torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}
    g = torch.Generator().manual_seed(2)
    grads = [{"w": torch.randn(4, 3, dtype=torch.float64, generator=g)} for _ in range(STEPS)]
    for name, value in CASES:
        needs = dict(OPTION_CASES[name][1])
        if RMSpropOptions.__dataclass_fields__[name].metadata["kind"] == INITIAL_STATE:
            continue

        def run(**kw):
            state = rmsprop_init(params, momentum=kw.get("momentum", 0), centered=kw.get("centered", False))
            p, s = params, state
            for step in range(STEPS):
                lr = kw.get("lr", 1e-2) * (1 + 0.5 * math.sin(step))
                p, s = rmsprop_update(p, grads[step], s, **{**BASE, **kw, "lr": lr})
            return p["w"]

        assert not torch.equal(run(**needs), run(**{**needs, name: value})), name


def test_rmsprop_step_keywords_and_defaults_follow_the_registry():
    """rmsprop_step's keywords are the options (but the initial state) plus its per-call
    arguments; the options it gives a default have the registry's default, the others
    (torch's seven) are required."""
    sig = inspect.signature(rmsprop_step).parameters
    keyword_only = {n: p for n, p in sig.items() if p.kind == inspect.Parameter.KEYWORD_ONLY}
    per_call = {"state_steps", "found_inf", "segment_ids", "segment_sizes"}
    options = {n for n in RMSpropOptions.names()
               if RMSpropOptions.__dataclass_fields__[n].metadata["kind"] != INITIAL_STATE}
    assert set(keyword_only) == options | per_call
    defaults = RMSpropOptions.defaults()
    for name in options:
        default = keyword_only[name].default
        if default is inspect.Parameter.empty:
            assert name in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"), name
        else:
            assert default == defaults[name], name
    assert all(keyword_only[n].default is None for n in per_call)


def test_every_option_is_accepted_stored_and_documented():
    """Each option: the constructor takes a value off its default and its param group
    holds it; it is documented in the registry (its field's doc) and, unless it is one
    of torch's seven, in README's table of options; torch's seven keep the defaults
    torch.optim.RMSprop's signature gives. (NpuFusedRMSprop's docstring points to
    RMSpropOptions for the full list.)"""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    torch_sig = inspect.signature(torch.optim.RMSprop).parameters
    for name, value in CASES:
        needs = OPTION_CASES[name][1]
        opt = NpuFusedRMSprop([torch.nn.Parameter(torch.zeros(3))], **{**needs, name: value})
        assert opt.param_groups[0][name] == value, name
        assert RMSpropOptions.doc(name), name
        if name in torch_sig:
            assert RMSpropOptions.defaults()[name] == torch_sig[name].default, name
        else:
            assert f"`{name}=" in readme, f"{name} is not in README's table of options"
    with pytest.raises(TypeError, match="unexpected keyword argument.*'foreach'.*the options are lr, alpha"):
        NpuFusedRMSprop([torch.nn.Parameter(torch.zeros(3))], foreach=True)


# -- a synthetic field is picked up by every derived list ---------------------------------


@dataclasses.dataclass(frozen=True)
class _Extended(RMSpropOptions):
    """The registry with three new fields of the kinds that were once left out: a
    STRUCTURE switch that defaults to on, a VALUE with a neutral value that is not its
    default, and a VALUE read at every step."""

    shiny: bool = _option(True, STRUCTURE, "a switch that is on by default", neutral=True)
    glow: Scalar = _option(0.5, VALUE, "a value that is off at 0", neutral=0.0)
    gain: Scalar = _option(2.0, VALUE, "a value always read", neutral=NO_NEUTRAL)


def test_a_new_field_reaches_the_derived_lists():
    on, off = _Extended(), _Extended(shiny=False, glow=0.0)
    assert {"shiny", "glow"} <= _Extended.structure_flags()
    assert "glow" in on.structure() and "shiny" not in on.structure()
    assert "shiny" in off.structure() and "glow" not in off.structure()
    assert _Extended.static_step_kwargs(on.structure())["shiny"] is True
    assert _Extended.static_step_kwargs(off.structure())["shiny"] is False
    assert _Extended.value_names()[-2:] == ("glow", "gain")
    assert _Extended.fixed_values(off.structure())["glow"] == 0.0
    assert "glow" not in _Extended.fixed_values(on.structure()) and "gain" not in _Extended.fixed_values(frozenset())
    assert {"shiny": True, "glow": 0.5, "gain": 2.0}.items() <= on.step_kwargs().items()


@pytest.mark.parametrize("options", [dict(), dict(shiny=False, glow=0.0)], ids=["defaults", "off"])
def test_a_new_field_reaches_the_bucket_step(monkeypatch, options):
    """``_make_python_step`` with the extended registry passes the new switch from the
    key's flags and the new values from the hyper tensor (or the neutral value the
    structure fixes) to rmsprop_step."""
    seen = {}
    layout = _Extended.value_names() + ("step",)
    monkeypatch.setattr(_bucket_step, "RMSpropOptions", _Extended)
    monkeypatch.setattr(_bucket_step, "HYPER_LAYOUT", layout)
    monkeypatch.setattr(_bucket_step, "FLAGS", _Extended.structure_flags() | {"found_inf"})
    monkeypatch.setattr(_bucket_step, "rmsprop_step", lambda *args, **kwargs: seen.update(kwargs))
    opts = _Extended(**options)
    fn = _bucket_step._make_python_step(_bucket_step.StepKey("eager", "cpu", torch.float32, opts.structure()))
    hyper = torch.arange(len(layout), dtype=torch.float64) + 10
    fn(*[torch.zeros(3)] * 5, hyper, None, None, None)
    assert seen["shiny"] is bool(opts.shiny)
    assert seen["gain"] == 10 + layout.index("gain")
    assert seen["glow"] == (10 + layout.index("glow") if opts.glow else 0.0)
    for name in RMSpropOptions.names():
        if RMSpropOptions.__dataclass_fields__[name].metadata["kind"] != INITIAL_STATE:
            assert name in seen, name
