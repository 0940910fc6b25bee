"""The bucket step through torchair's real FX-to-GE conversion (ascend_dry_run), its GE
graph evaluated op by op, against torch.optim.RMSprop, the NumPy references and the
library's eager step.

One dry run for the module (``dry_run`` in conftest.py). Every test builds its optimizer
with ``backend="torchair"``: Dynamo, AOT autograd, our pass, torchair's converters and GE
graph passes all run for real; only GE's compile and run are stand-ins (GE's run
evaluates the GraphDef, ``npu_optim_compile/_ge_eval.py``).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import reference_numpy as ref
from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop, NpuFusedRMSpropTF, RMSpropOptions
from npu_optim_compile._bucket_step import FLAGS

STEPS = 5
DTYPES = [torch.float32, torch.bfloat16]

#: The optimizer keywords that turn each structure flag on (``found_inf``: a GradScaler's
#: skip flag, set on the optimizer before each step, see ``_step``).
FLAG_KWARGS = {
    "centered": dict(centered=True),
    "maximize": dict(maximize=True),
    "eps_in_sqrt": dict(eps_in_sqrt=True),
    "lr_in_momentum": dict(lr_in_momentum=True),
    "decoupled_weight_decay": dict(decoupled_weight_decay=True),
    "lr_unscaled_decay": dict(lr_scaled_decay=False),
    "nesterov": dict(nesterov=True),
    "bias_correction": dict(bias_correction=True),
    "caution": dict(caution=True),
    "corrected_weight_decay": dict(corrected_weight_decay=True, max_lr=0.02),
    "momentum": dict(momentum=0.9),
    "weight_decay": dict(weight_decay=0.1),
    "loss_scale": dict(loss_scale=8.0),
    "op_order_tf": dict(op_order="tf"),
    "op_order_optax": dict(op_order="optax"),
    "found_inf": {},
}

#: Structures that cover every flag, and every on/off combination of every two flags
#: (three combinations cannot exist: nesterov without momentum, corrected decay with the
#: lr-unscaled one, two op orders at once), so every pair of options that changes the
#: graph together is converted together. Found greedily over all 27648 valid structures
#: (16 flags); ``test_structures_cover_every_pair`` checks the property.
STRUCTURES = [
    frozenset(),
    frozenset(FLAGS - {"lr_unscaled_decay", "op_order_optax"}),
    frozenset({"centered", "decoupled_weight_decay", "found_inf", "loss_scale", "lr_in_momentum",
               "lr_unscaled_decay", "momentum", "nesterov", "op_order_optax"}),
    frozenset({"bias_correction", "caution", "eps_in_sqrt", "lr_unscaled_decay", "maximize", "op_order_optax",
               "weight_decay"}),
    frozenset({"centered", "corrected_weight_decay", "eps_in_sqrt", "momentum", "nesterov", "op_order_tf",
               "weight_decay"}),
    frozenset({"caution", "corrected_weight_decay", "decoupled_weight_decay", "loss_scale", "lr_in_momentum",
               "maximize", "op_order_tf"}),
    frozenset({"bias_correction", "caution", "decoupled_weight_decay", "found_inf", "lr_unscaled_decay",
               "momentum", "op_order_tf"}),
    frozenset({"bias_correction", "centered", "corrected_weight_decay", "eps_in_sqrt", "found_inf", "loss_scale",
               "maximize", "op_order_optax"}),
    frozenset({"bias_correction", "corrected_weight_decay", "found_inf", "lr_in_momentum", "momentum", "nesterov",
               "op_order_optax", "weight_decay"}),
]  # fmt: skip
_IMPOSSIBLE = {
    ("corrected_weight_decay", True, "lr_unscaled_decay", True),
    ("momentum", False, "nesterov", True),
    ("op_order_optax", True, "op_order_tf", True),
}


def structure_id(flags: frozenset) -> str:
    return ",".join(sorted(flags)) or "default"


def lr_at(step: int) -> float:
    return 0.01 * (1.0 + 0.5 * math.sin(step))


def test_structures_cover_every_pair():
    assert set(FLAG_KWARGS) == FLAGS, "a new structure flag needs its keywords here (and a structure)"
    covered = {
        (a, a in s, b, b in s) for s in STRUCTURES for a, b in itertools.combinations(sorted(FLAGS), 2)
    }
    every = {(a, x, b, y) for a, b in itertools.combinations(sorted(FLAGS), 2) for x in (False, True) for y in (False, True)}
    assert every - covered == _IMPOSSIBLE


def _kwargs(flags: frozenset) -> dict:
    kwargs = {}
    for flag in sorted(flags):
        kwargs.update(FLAG_KWARGS[flag])
    assert RMSpropOptions(**kwargs).structure() == flags - {"found_inf"}  # what the optimizer compiles
    return kwargs


def _step(opt: torch.optim.Optimizer, step: int, skip: bool) -> None:
    """One step with lr changing every step and the other values once (same structure);
    with ``skip``, torch.amp.GradScaler's contract: ``found_inf`` set, 1 on step 2."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step)
        if step == 3:
            group["alpha"], group["eps"] = 0.9, group["eps"] / 2
            for key, value in (("momentum", 0.5), ("weight_decay", 0.05), ("loss_scale", 4.0)):
                if key in group and group[key] != RMSpropOptions.defaults()[key]:
                    group[key] = value
    if skip:
        opt.grad_scale, opt.found_inf = None, torch.tensor(float(step == 2))
    opt.step()
    if skip:
        del opt.grad_scale, opt.found_inf


def _record(ge_table, key, graph) -> None:
    ops = ", ".join(f"{t} {n}" for t, n in sorted(graph.op_counts.items()))
    ge_table[key] = (graph.node_count, graph.cast_count, ops)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", STRUCTURES, ids=structure_id)
def test_every_structure_converts_and_its_ge_graph_computes_the_step(dry_run, ge_table, flags, dtype):
    """The GE graph of each structure, evaluated, equals the library's eager step (the FX
    graph torchair converted, run by torch; tests/math checks it against the NumPy
    references) over steps with a changing lr; one GE graph, no recompile; no DT_DOUBLE."""
    # A large eps: centered with bias correction cancels to ~0 at step 1 (tests/math/
    # test_variants.py::_ill_posed); a small eps leaves the root of a rounding error
    # (bf16's at g**2 ~ 2 is 0.016).
    kwargs = dict(_kwargs(flags), eps=1e-2 if dtype == torch.float32 else 1e-1)
    skip = "found_inf" in flags
    po = make_params(dtype)
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="torchair", **kwargs)
    eager = NpuFusedRMSprop(pr, backend="eager", **kwargs)
    before = len(dry_run.graphs)
    for step in range(STEPS):
        set_grads(step, po, pr)
        _step(ours, step, skip)
        _step(eager, step, skip)
        if step == 0:
            after_first = len(dry_run.graphs)
    new = dry_run.graphs[before:]
    assert len(dry_run.graphs) == after_first, "a value change recompiled"
    # One GE graph per structure; caution compiles a second one (test_caution_compiles_once).
    assert len(new) == (2 if {"caution", "momentum"} <= flags else 1), [g.summary() for g in new]
    graph = new[-1]
    assert graph.runs == STEPS + (len(new) == 1)  # every step (plus the compile on scratch buffers)
    assert all("DT_DOUBLE" not in g.dtypes() for g in new), graph.summary()
    assert_same_state(ours, eager, po, pr, **TOLERANCES[dtype])
    _record(ge_table, (structure_id(flags), str(dtype).removeprefix("torch.")), graph)


@pytest.mark.xfail(
    strict=True,
    reason="_bucket_step._run_on_scratch compiles caution on 2 segments (segment_sizes of 3 entries); "
    "Dynamo specialises that size and a real bucket of n params (n+1 entries) compiles again, with "
    "inductor too",
)
def test_caution_compiles_once(dry_run):
    p = make_params()
    opt = NpuFusedRMSprop(p, backend="torchair", momentum=0.9, caution=True)
    before = len(dry_run.graphs)
    set_grads(0, p)
    opt.step()
    assert len(dry_run.graphs) - before == 1


TORCH_CASES = [dict(), dict(momentum=0.9, centered=True, weight_decay=0.1, maximize=True)]

#: Against torch itself: on an NPU the hyperparameters are float32 (``hyper_dtype``), so
#: ``1 - alpha`` and ``-lr`` round to float32 where torch computes them with Python
#: floats (the GE graph equals the library's eager step with the same float32 values at
#: TOLERANCES, the structure test above). fp32 uses torch.testing.assert_close's own
#: defaults for float32; measured: 3.1e-6 abs (2e-6 rel) on a momentum buffer of
#: magnitude 1.5 after 5 steps, where TOLERANCES' 1e-6 fits float64 hyperparameters.
NPU_TOLERANCES = {torch.float32: dict(rtol=1.3e-6, atol=1e-5), torch.bfloat16: TOLERANCES[torch.bfloat16]}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kwargs", TORCH_CASES, ids=["default", "momentum-centered-wd-maximize"])
def test_ge_graph_matches_torch_rmsprop(dry_run, kwargs, dtype):
    po = make_params(dtype)
    pr = clone_params(po)
    ours = NpuFusedRMSprop(po, backend="torchair", **kwargs)
    torch_ref = torch.optim.RMSprop(pr, **kwargs)
    for step in range(STEPS):
        set_grads(step, po, pr)
        for opt in (ours, torch_ref):
            _step(opt, step, skip=False)
    assert_same_state(ours, torch_ref, po, pr, **NPU_TOLERANCES[dtype])


def test_ge_graph_under_grad_scaler_matches_torch(dry_run):
    """torch.amp.GradScaler: the grads unscaled before the graph, an inf step skipped in it."""
    kwargs = dict(momentum=0.9, centered=True, weight_decay=0.1)
    po = make_params()
    pr = clone_params(po)
    ours, torch_ref = NpuFusedRMSprop(po, backend="torchair", **kwargs), torch.optim.RMSprop(pr, **kwargs)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) for _ in range(2)]
    for step in range(STEPS):
        for params, opt, scaler in ((po, ours, scalers[0]), (pr, torch_ref, scalers[1])):
            set_grads(step, params)
            loss = sum((p * p.grad.detach()).sum() for p in params) * (math.inf if step == 2 else 1.0)
            opt.zero_grad()
            scaler.scale(loss).backward()  # grads: scale * the step's grads (inf on step 2)
            scaler.step(opt)
            scaler.update()
    assert float(ours.state[po[0]]["step"]) == STEPS - 1
    assert_same_state(ours, torch_ref, po, pr, **NPU_TOLERANCES[torch.float32])


# --- framework variants against their NumPy references (tests/support/reference_numpy.py)

EPS = 1e-2
SHAPES = [(5, 3), (4,)]
#: rtol/atol against the float64 reference: the compiled fp32 variants' in
#: tests/math/test_variants.py, but for optax's centered step with bias correction, where
#: nu_hat - mu_hat**2 cancels (test_variants.py::_ill_posed) and float32
#: hyperparameters, as on an NPU, put the eager step as far from the reference as the GE
#: graph: 4.3e-5 relative, measured (the test checks that the GE graph equals it).
PRESET_TOLERANCE = {"optax-nesterov-bias_correction": dict(rtol=1e-4, atol=1e-5)}
PRESETS = {
    "timm-caution-corrected-decay": (
        lambda p: NpuFusedRMSprop(p, alpha=0.9, eps=EPS, eps_in_sqrt=True, initial_square_avg=1.0, momentum=0.9,
                                  lr_in_momentum=True, decoupled_weight_decay=True, weight_decay=0.1, caution=True,
                                  corrected_weight_decay=True, max_lr=0.02, backend="torchair"),
        ref.timm_rmsprop_tf, "lr",
        dict(alpha=0.9, eps=EPS, momentum=0.9, decoupled_decay=True, weight_decay=0.1, caution=True,
             corrected_weight_decay=True, max_lr=0.02)),
    "torch_npu_tf": (
        lambda p: NpuFusedRMSpropTF(p, eps=EPS, momentum=0.9, centered=True, weight_decay=0.1, decoupled_decay=True,
                                    backend="torchair"),
        ref.torch_npu_rmsprop_tf, "lr", dict(eps=EPS, momentum=0.9, centered=True, weight_decay=0.1, decoupled_decay=True)),
    "mindspore-loss_scale": (
        lambda p: NpuFusedRMSprop.from_mindspore(p, epsilon=EPS, momentum=0.9, loss_scale=64.0, weight_decay=1e-2,
                                                 backend="torchair"),
        ref.mindspore_rmsprop, "learning_rate", dict(epsilon=EPS, momentum=0.9, loss_scale=64.0, weight_decay=1e-2)),
    "optax-nesterov-bias_correction": (
        lambda p: NpuFusedRMSprop(p, alpha=0.9, eps=EPS, centered=True, momentum=0.9, nesterov=True, bias_correction=True,
                                  eps_in_sqrt=True, lr_in_momentum=True, backend="torchair"),
        ref.optax_rmsprop, "learning_rate",
        dict(decay=0.9, eps=EPS, eps_in_sqrt=True, centered=True, momentum=0.9, nesterov=True, bias_correction=True)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(PRESETS))
def test_ge_graph_matches_framework_reference(dry_run, name):
    """fp32 GE graph against the float64 NumPy reference, with the tolerance the compiled
    fp32 variants use in tests/math/test_variants.py."""
    make_opt, fn, lr_key, kwargs = PRESETS[name]
    rng = np.random.default_rng(7)
    start = [rng.standard_normal(s) for s in SHAPES]
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float32)) for p in start]
    twins = clone_params(params)
    opt, eager = make_opt(params), make_opt(twins)
    eager._engine.backend = "eager"  # the same optimizer, its step run by torch
    expected, states = [p.copy() for p in start], [{} for _ in start]
    for step in range(STEPS):
        grads = [np.random.default_rng(100 + step).standard_normal(s) for s in SHAPES]
        for o, ps in ((opt, params), (eager, twins)):
            for group in o.param_groups:
                group["lr"] = lr_at(step)
            for p, g in zip(ps, grads):
                p.grad = torch.tensor(g, dtype=torch.float32)
            o.step()
        expected = [fn(e, g, s, **{lr_key: lr_at(step)}, **kwargs) for e, g, s in zip(expected, grads, states)]
    tolerance = PRESET_TOLERANCE.get(name, dict(rtol=2e-5, atol=2e-6))
    for p, q, e in zip(params, twins, expected):
        np.testing.assert_allclose(p.detach().double().numpy(), e, **tolerance)
        torch.testing.assert_close(p.detach(), q.detach(), **TOLERANCES[torch.float32])


# --- what reaches GE ---------------------------------------------------------------------


def test_dump_dir_holds_the_ge_dumps(dry_run, tmp_path):
    """NpuFusedRMSprop(dump_dir=...) makes torchair dump its GE graph (.pbtxt); the dry
    run's own dump holds what GE received."""
    p = make_params()
    opt = NpuFusedRMSprop(p, backend="torchair", momentum=0.9, dump_dir=tmp_path)
    before = len(dry_run.graphs)
    set_grads(0, p)
    opt.step()
    (folder,) = tmp_path.iterdir()
    torchair_dumps = sorted(folder.glob("dynamo_original_graph_*.pbtxt"))
    assert torchair_dumps, sorted(f.name for f in folder.iterdir())
    text = torchair_dumps[0].read_text()
    assert 'op: "NetOutput"' in text and 'op: "Sqrt"' in text
    assert {"dynamo_graph.py", "aten_before_fusion.py", "aten_after_fusion.py", "summary.json"} <= {
        f.name for f in folder.iterdir()
    }
    (graph,) = dry_run.graphs[before:]
    ours = sorted(Path(dry_run.dump_dir).glob(f"ge_*_{graph.name}.pbtxt"))
    assert ours and f'name: "{graph.name}"' in ours[-1].read_text()


def test_a_double_in_a_graph_is_seen(dry_run):
    """The DT_DOUBLE check can fail: a float64 input reaches the GE graph as DT_DOUBLE."""
    backend = dry_run.torchair.get_npu_backend(compiler_config=dry_run.torchair.CompilerConfig())
    before = len(dry_run.graphs)
    x = torch.arange(3, dtype=torch.float64)
    torch.testing.assert_close(torch.compile(lambda t: t * 2 + 1, backend=backend)(x), x * 2 + 1)
    (graph,) = dry_run.graphs[before:]
    assert "DT_DOUBLE" in graph.dtypes()


@pytest.mark.parametrize("mode", ["npugraph_ex", "reduce-overhead"])
def test_acl_graph_modes_stop_where_torchair_needs_torch_npu(dry_run, mode, tmp_path):
    """The ACL-graph modes run Dynamo and AOT autograd; torchair's AclConcreteGraph then
    imports torch_npu (for NPUGraph), before our pass and its own ACL passes run."""
    p = make_params()
    opt = NpuFusedRMSprop(p, backend="torchair", npu_mode=mode, dump_dir=tmp_path)
    set_grads(0, p)
    with pytest.raises(Exception, match=f"Couldn't import torch_npu. When the CompilerConfig.mode is {mode}"):
        opt.step()
    (folder,) = tmp_path.iterdir()
    assert (folder / "dynamo_graph.py").is_file()  # Dynamo ran
    assert not (folder / "aten_before_fusion.py").exists()  # our pass did not
    assert float(opt.state[p[0]]["step"]) == 0  # and the failed step changed nothing


# --- the GE interpreter on hand-built graphs (npu_optim_compile/_ge_eval.py) -------------


class Graph:
    """A GraphDef built op by op (torchair's ge_ir_pb2), inputs as ``"node:0"``."""

    def __init__(self):
        from torchair._ge_concrete_graph.ge_ir_pb2 import GraphDef

        self.g = GraphDef(name="hand_built")

    def op(self, type_, name, inputs=(), **attrs):
        op = self.g.op.add(type=type_, name=name)
        op.input.extend(inputs)
        for key, value in attrs.items():
            if isinstance(value, bool):
                op.attr[key].b = value
            elif isinstance(value, int):
                op.attr[key].i = value
            elif isinstance(value, float):
                op.attr[key].f = value
            else:
                raise TypeError(value)
        return f"{name}:0"

    def data(self, name, index, dtype):
        out = self.op("Data", name, index=index)
        self.g.op[-1].output_desc.add().dtype = self.g.DESCRIPTOR.file.enum_types_by_name["DataType"].values_by_name[dtype].number
        return out

    def run(self, *inputs, outputs):
        from npu_optim_compile import _ge_eval

        self.op("NetOutput", "NetOutput", outputs)
        return _ge_eval.evaluate(self.g, list(inputs))


def test_interpreter_sxpy_promotes_and_reads_the_optional_alpha(dry_run):
    g = Graph()
    x1, x2, alpha = g.data("x1", 0, "DT_BF16"), g.data("x2", 1, "DT_FLOAT"), g.data("alpha", 2, "DT_FLOAT")
    with_alpha = g.op("Sxpy", "s", [x1, x2, alpha])
    without = g.op("Sxpy", "t", [x1, x2, ""])  # an absent optional input keeps its place
    args = torch.tensor([5.0, 1.0], dtype=torch.bfloat16), torch.tensor(2.0), torch.tensor(3.0)
    y, z = g.run(*args, outputs=[with_alpha, without])
    assert y.dtype == torch.float32 and y.tolist() == [-1.0, -5.0]  # x1 - x2 * alpha, float32 (Promote)
    assert z.tolist() == [3.0, -1.0]


def test_interpreter_mul_promotes_by_dtype_not_by_rank(dry_run):
    """torch would keep bf16 for a 1-D bf16 times a 0-d float32; CANN's Promote gives float32."""
    g = Graph()
    y = g.op("Mul", "m", [g.data("a", 0, "DT_BF16"), g.data("b", 1, "DT_FLOAT")])
    (out,) = g.run(torch.tensor([1.0, 3.0], dtype=torch.bfloat16), torch.tensor(1 / 3), outputs=[y])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([1 / 3, 1.0]))


def test_interpreter_refuses_what_ge_would(dry_run):
    from npu_optim_compile._ge_eval import GeEvalError, UnknownGeOpError

    g = Graph()
    a, b = g.data("a", 0, "DT_FLOAT"), g.data("b", 1, "DT_BF16")
    g.op("Add", "add", [a, b])
    with pytest.raises(GeEvalError, match="Add 'add' takes inputs of one dtype.*DT_BF16, DT_FLOAT"):
        g.run(torch.ones(2), torch.ones(2, dtype=torch.bfloat16), outputs=[])
    g = Graph()
    g.op("FancyFusedOp", "fancy", [g.data("a", 0, "DT_FLOAT")])
    with pytest.raises(UnknownGeOpError, match="no definition of GE op 'FancyFusedOp' \\(node 'fancy'\\)"):
        g.run(torch.ones(2), outputs=[])
    g = Graph()
    g.op("Gather", "gather", [g.data("x", 0, "DT_FLOAT"), g.data("i", 1, "DT_INT64")])
    with pytest.raises(GeEvalError, match=r"indices must be in \[0, 3\)"):
        g.run(torch.ones(3), torch.tensor([3]), outputs=[])
    g = Graph()
    g.op("Sqrt", "sqrt", [g.data("x", 0, "DT_FLOAT")])
    with pytest.raises(GeEvalError, match="Data 'x' declares DT_FLOAT, got a torch.float64 input"):
        g.run(torch.ones(3, dtype=torch.float64), outputs=[])


def test_interpreter_cast_reads_ge_runtime_dtype_codes(dry_run):
    """Cast's dst_type is ge::DataType (12 is DT_BOOL there, DT_DOUBLE in ge_ir.proto)."""
    g = Graph()
    x = g.data("x", 0, "DT_FLOAT")
    as_bool, as_bf16 = g.op("Cast", "c1", [x], dst_type=12), g.op("Cast", "c2", [x], dst_type=27)
    flags, rounded = g.run(torch.tensor([0.0, 1.0 + 2**-10]), outputs=[as_bool, as_bf16])
    assert flags.dtype == torch.bool and flags.tolist() == [False, True]
    assert rounded.dtype == torch.bfloat16 and rounded.tolist() == [0.0, 1.0]


def test_interpreter_inplace_index_add_accumulates_duplicates(dry_run):
    g = Graph()
    var, idx, upd = g.data("v", 0, "DT_FLOAT"), g.data("i", 1, "DT_INT32"), g.data("u", 2, "DT_FLOAT")
    out = g.op("InplaceIndexAdd", "add", [g.op("TensorMove", "copy", [var]), idx, upd], axis=0)
    v = torch.zeros(3)
    (y,) = g.run(v, torch.tensor([0, 2, 0], dtype=torch.int32), torch.tensor([1.0, 2.0, 4.0]), outputs=[out])
    assert y.tolist() == [5.0, 0.0, 2.0] and v.tolist() == [0.0, 0.0, 0.0]  # TensorMove copied it


# --- the compiled train step on Ascend (issue 15, item 3) --------------------------------

def _train_loop(make_step, backend: str, steps: int = 4, after_step=lambda: None, options=None, set_to_none=True,
                dtype=torch.float32):
    """An elementwise model (its GE ops are in the interpreter), an LR scheduler, and the
    step compiled by ``make_step``; returns the params and the optimizer after ``steps``
    steps. ``backend="torch"``: torch.optim.RMSprop, eagerly."""
    options = dict(momentum=0.9) if options is None else options
    g = torch.Generator().manual_seed(0)
    w, b = (torch.nn.Parameter(torch.randn(6, generator=g).to(dtype)) for _ in range(2))
    if backend == "torch":
        opt = torch.optim.RMSprop([w, b], lr=0.01, **options)
    else:
        opt = NpuFusedRMSprop([w, b], lr=0.01, backend=backend, **options)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def train_step(x, y):
        loss = ((w * x + b - y) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        return loss

    step = make_step(train_step)
    for i in range(steps):
        x, y = torch.randn(6, generator=g).to(dtype), torch.randn(6, generator=g).to(dtype)
        step(x, y)
        scheduler.step()
        after_step()
    return [w.detach(), b.detach()], opt


def _check_against_eager(dry_run, make_step, reference="eager", dtype=torch.float32, **kwargs):
    """Equal to the eager loop; GE graphs made at the first step only (the lr halves at
    every step: a graph input, no recompile); the step's own graph holds the bucket's
    ConcatV2/SplitV and the step's math."""
    torch._dynamo.reset()  # (each test compiles train_step's code anew: no recompile limit across tests)
    expected, ref_opt = _train_loop(lambda fn: fn, reference, dtype=dtype, **kwargs)
    before = len(dry_run.graphs)
    counts: list[int] = []
    got, opt = _train_loop(make_step, "torchair", after_step=lambda: counts.append(len(dry_run.graphs)), dtype=dtype,
                           **kwargs)
    assert counts[0] > before and counts == counts[:1] * len(counts), counts
    new = dry_run.graphs[before:]
    assert all(graph.runs == len(counts) for graph in new)
    assert any({"ConcatV2", "SplitV", "Sqrt", "RealDiv"} <= set(graph.op_counts) for graph in new)
    assert_same_state(opt, ref_opt, got, expected, **NPU_TOLERANCES[dtype])
    return new


def test_users_torch_compile_with_torchair_backend(dry_run):
    torchair = dry_run.torchair
    backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    _check_against_eager(dry_run, lambda fn: torch.compile(fn, backend=backend))


def test_compile_train_step_with_torchair(dry_run):
    from npu_optim_compile import compile_train_step

    _check_against_eager(dry_run, lambda fn: compile_train_step(fn, backend="torchair"))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(centered=True, momentum=0.9, weight_decay=0.1), dict(momentum=0.5, maximize=True)],
    ids=["default", "centered-momentum-wd", "momentum-maximize"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_users_torch_compile_matches_torch_optim(dry_run, options, dtype):
    """The user's torch.compile(train_step) through torchair against torch.optim.RMSprop
    run eagerly, with zero_grad(set_to_none=False) (grads zeroed inside the graph)."""
    backend = dry_run.torchair.get_npu_backend(compiler_config=dry_run.torchair.CompilerConfig())
    _check_against_eager(dry_run, lambda fn: torch.compile(fn, backend=backend), reference="torch",
                         options=options, set_to_none=False, dtype=dtype)


def test_users_torch_compile_retraces_when_a_number_changes(dry_run):
    """alpha is a constant of the traced step: changing it retraces (Dynamo's guard), and
    the new value is used, as torch.optim.RMSprop uses it."""
    backend = dry_run.torchair.get_npu_backend(compiler_config=dry_run.torchair.CompilerConfig())
    results = []
    for backend_name, make in (("torch", lambda fn: fn), ("torchair", lambda fn: torch.compile(fn, backend=backend))):
        holder = {}

        def change_alpha():
            holder["n"] = holder.get("n", 0) + 1
            if holder["n"] == 2:
                for group in holder["opt"].param_groups:
                    group["alpha"] = 0.5

        def make_step(fn, make=make):
            holder["opt"] = fn.__closure__[next(i for i, n in enumerate(fn.__code__.co_freevars) if n == "opt")].cell_contents
            return make(fn)

        results.append(_train_loop(make_step, backend_name, after_step=change_alpha))
    (want, ref_opt), (got, opt) = results
    assert_same_state(opt, ref_opt, got, want, **NPU_TOLERANCES[torch.float32])


def test_users_torch_compile_steps_eagerly_where_torchair_cannot_take_the_options(dry_run):
    """caution=True: a warning, the step runs eagerly (a graph break; its bucket step
    compiled by torchair), the result is the eager loop's."""
    torch._dynamo.reset()
    backend = dry_run.torchair.get_npu_backend(compiler_config=dry_run.torchair.CompilerConfig())
    options = dict(momentum=0.9, caution=True)
    want, ref = _train_loop(lambda fn: fn, "eager", options=options)
    with pytest.warns(UserWarning, match=r"param group 0 cannot become part of a graph that torchair compiles "
                                         r"with caution=True; opt\.step\(\) runs eagerly"):
        got, opt = _train_loop(lambda fn: torch.compile(fn, backend=backend), "torchair", options=options)
    assert_same_state(opt, ref, got, want, **NPU_TOLERANCES[torch.float32])


def test_compile_train_step_builds_torchair_with_our_pass(dry_run):
    """compile_train_step(backend="torchair") imports its backend (train_step.py once
    imported a module that had been renamed) and hands torchair our pass."""
    from npu_optim_compile import compile_train_step
    from npu_optim_compile.passes import torchair_foreach_fusion

    compiled = compile_train_step(lambda x: torch._foreach_sqrt([x, x + 1]), backend="torchair")
    assert compiled.fusion_pass is torchair_foreach_fusion
    before = len(dry_run.graphs)
    x = torch.rand(5)
    for out, want in zip(compiled(x), torch._foreach_sqrt([x, x + 1])):  # _foreach_sqrt has no GE converter
        torch.testing.assert_close(out, want)
    (graph,) = dry_run.graphs[before:]
    assert graph.op_counts["Sqrt"] >= 1


@torch.library.custom_op("npu_optim_compile_test::scale_all_", mutates_args=("xs",))
def _scale_all_(xs: list[torch.Tensor], factor: float) -> None:
    for x in xs:
        x.mul_(factor)


def test_torchair_cannot_convert_an_op_mutating_a_tensor_list(dry_run):
    """Why the op must be functional: torchair 2.13.0's auto_functionalized_v2 converter
    (_ge_concrete_graph/auto_functionalized_v2.py) calls ``view_copy`` on each mutated
    argument's view info, a list for a Tensor[] argument. (If this starts passing, a
    mutating op becomes possible again.)"""
    torchair = dry_run.torchair
    torchair.register_fx_node_ge_converter(torch.ops.npu_optim_compile_test.scale_all_.default)(lambda xs, factor: None)
    backend = torchair.get_npu_backend(compiler_config=torchair.CompilerConfig())
    xs = [torch.ones(3), torch.ones(2)]
    compiled = torch.compile(lambda xs: torch.ops.npu_optim_compile_test.scale_all_(xs, 2.0), backend=backend)
    with pytest.raises(Exception, match="'list' object has no attribute 'view_copy'"):
        compiled(xs)
