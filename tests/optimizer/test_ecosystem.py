"""The optimizer among the tools users have: checkpoint savers, shared memory, ties,
aliases a user holds, a second optimizer, memory. Each case side by side with
``torch.optim.RMSprop``, with the real packages (accelerate, safetensors, transformers,
torch.multiprocessing), by default and with ``combine_params=True``.
"""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from parity import assert_same_state
from npu_optim_compile import NpuFusedRMSprop

#: torch.testing's float32 defaults. Checked against float64 for the two-optimizer case
#: (6 steps of a tiny MLP, two optimizers feeding each other's params): torch's fp32 run
#: ends 2.6e-6 from the fp64 run, ours 5.0e-6, both on a momentum buffer near 0.
TOL = dict(rtol=1.3e-6, atol=1e-5)

OPTIMIZERS = {
    "torch": lambda params, **kw: torch.optim.RMSprop(params, **kw),
    "ours": lambda params, **kw: NpuFusedRMSprop(params, **kw),
    "combined": lambda params, **kw: NpuFusedRMSprop(params, combine_params=True, **kw),
}
EACH = pytest.mark.parametrize("name", list(OPTIMIZERS))


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=99, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config)


def bert_steps(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 99, (4, 12), generator=g)
        labels = torch.randint(0, 2, (4,), generator=g)
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def mlp_steps(model, opt, steps, seed=0, before_step=None):
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x = torch.randn(5, 6, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        if before_step is not None:
            before_step(i)
        opt.step()


# -- 1. checkpoint savers that look at storages ----------------------------------------


@EACH
def test_accelerate_save_state_and_load_state(name, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_bert()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, OPTIMIZERS[name](model.parameters(), lr=1e-3))
    bert_steps(model, opt, 2)
    accelerator.save_state(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert saved == set(model.state_dict())
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    bert_steps(model, opt, 1, seed=1)  # move away, then come back
    accelerator.load_state(str(tmp_path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    bert_steps(model, opt, 1, seed=2)  # and train on from there


@EACH
def test_accelerate_save_model_keeps_every_key(name, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_bert()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-3)
    bert_steps(model, opt, 1)
    accelerate.Accelerator(cpu=True).save_model(model, str(tmp_path))
    from safetensors.torch import load_file

    files = sorted(tmp_path.glob("*.safetensors"))
    saved = {k for f in files for k in load_file(str(f))}
    # tied weights (the word embeddings and the decoder) are saved once by design
    assert saved == set(model.state_dict()) - {"cls.predictions.decoder.weight"}


@EACH
def test_safetensors_save_model_round_trip(name, tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = tiny_bert()
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-3)
    bert_steps(model, opt, 1)
    safetensors_torch.save_model(model, str(tmp_path / "m.safetensors"))
    other = tiny_bert()
    safetensors_torch.load_model(other, str(tmp_path / "m.safetensors"))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


# -- 2. shared memory --------------------------------------------------------------------


def _hogwild_worker(model, name, steps):
    torch.set_num_threads(1)
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2, momentum=0.5)
    mlp_steps(model, opt, steps, seed=3)


@pytest.mark.parametrize("name", ["ours", "combined"])
def test_shared_memory_model_trained_in_a_worker(name):
    """``model.share_memory()`` then a worker process trains it (Hogwild): the shared
    params change, exactly as a worker running torch.optim.RMSprop changes them."""
    mp = torch.multiprocessing.get_context("spawn")
    results = {}
    for who in ("torch", name):
        model = mlp()
        model.share_memory()
        start = [p.detach().clone() for p in model.parameters()]
        worker = mp.Process(target=_hogwild_worker, args=(model, who, 4))
        worker.start()
        worker.join(timeout=300)
        assert worker.exitcode == 0, f"{who} worker failed"
        assert all(p.is_shared() for p in model.parameters())
        results[who] = [p.detach().clone() for p in model.parameters()]
        assert max((p - s).abs().max().item() for p, s in zip(results[who], start)) > 1e-3
    for a, b in zip(results[name], results["torch"]):
        torch.testing.assert_close(a, b, **TOL)


# -- 3. ties made after the first step ---------------------------------------------------


@pytest.mark.parametrize("name", ["ours", "combined"])
def test_tie_made_after_the_first_step_holds(name):
    runs = {}
    for who in ("torch", name):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        model = torch.nn.Sequential(a, b)
        opt = OPTIMIZERS[who](model.parameters(), lr=1e-2, weight_decay=0.1)

        def tie(i):
            if i == 1:
                b.weight.data = a.weight.data

        mlp_steps_4(model, opt, 4, tie)
        assert a.weight.data_ptr() == b.weight.data_ptr()
        runs[who] = (model, opt)
    (mo, oo), (mr, orf) = runs[name], runs["torch"]
    assert_same_state(oo, orf, list(mo.parameters()), list(mr.parameters()), **TOL)


def mlp_steps_4(model, opt, steps, before_step):
    g = torch.Generator().manual_seed(7)
    for i in range(steps):
        x = torch.randn(3, 4, generator=g)
        opt.zero_grad()
        model(x).square().mean().backward()
        before_step(i)
        opt.step()


# -- 4. aliases a user holds, across a change of layout ----------------------------------


@pytest.mark.parametrize("name", ["ours", "combined"])
def test_aliases_follow_the_params_across_a_layout_change(name):
    """A ``model.state_dict()``, a ``p.detach()`` and an ``opt.state_dict()`` kept
    without copying, while one bias is frozen for a step (the set of params with a grad
    changes): the first two keep following the params, and loading the kept optimizer
    state later gives what it gives with torch."""
    runs = {}
    for who in ("torch", name):
        model = mlp()
        opt = OPTIMIZERS[who](model.parameters(), lr=1e-2, momentum=0.5)
        mlp_steps(model, opt, 2)
        kept_model = model.state_dict()
        kept_weight = model[0].weight.detach()
        kept_opt = opt.state_dict()

        def freeze(i):
            model[2].bias.grad = None if i == 1 else model[2].bias.grad

        mlp_steps(model, opt, 4, seed=1, before_step=freeze)
        for k, v in model.state_dict().items():
            assert torch.equal(kept_model[k], v), (who, k)
        assert torch.equal(kept_weight, model[0].weight.detach())
        fresh = OPTIMIZERS[who](model.parameters(), lr=1e-2, momentum=0.5)
        fresh.load_state_dict(kept_opt)
        mlp_steps(model, fresh, 1, seed=2)
        runs[who] = (model, fresh)
    (mo, oo), (mr, orf) = runs[name], runs["torch"]
    assert float(oo.state[mo[0].weight]["step"]) == float(orf.state[mr[0].weight]["step"]) == 7
    assert_same_state(oo, orf, list(mo.parameters()), list(mr.parameters()), **TOL)


# -- 5. a state_dict held at the first step ----------------------------------------------


@pytest.mark.parametrize("name", ["ours", "combined"])
def test_a_held_state_dict_keeps_the_step_fused(name):
    model = mlp()
    held = model.state_dict()  # noqa: F841 - held on purpose
    opt = OPTIMIZERS[name](model.parameters(), lr=1e-2)
    mlp_steps(model, opt, 2)
    buckets = opt.describe_buckets()
    assert [b["kind"] for b in buckets] == ["segments"]
    assert buckets[0]["tensors"] == len(list(model.parameters()))


# -- 6. two optimizers over the same params ----------------------------------------------


@pytest.mark.parametrize("name", ["ours", "combined"])
def test_two_optimizers_over_the_same_params(name):
    runs = {}
    for who in ("torch", name):
        model = mlp()
        first = OPTIMIZERS[who](model.parameters(), lr=1e-2)
        second = OPTIMIZERS[who](model.parameters(), lr=1e-3, momentum=0.5)
        g = torch.Generator().manual_seed(5)
        for i in range(6):
            x = torch.randn(5, 6, generator=g)
            for opt in (first, second):
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            if who != "torch" and i == 2:
                generations = (first._engine.generation, second._engine.generation)
        if who != "torch":  # neither plans anew once both run: nothing moves
            assert (first._engine.generation, second._engine.generation) == generations
        runs[who] = (model, first, second)
    (mo, o1, o2), (mr, r1, r2) = runs[name], runs["torch"]
    assert_same_state(o1, r1, list(mo.parameters()), list(mr.parameters()), **TOL)
    assert_same_state(o2, r2, list(mo.parameters()), list(mr.parameters()), **TOL)


# -- 7. persistent memory ----------------------------------------------------------------


def _live_bytes() -> int:
    """Bytes of every distinct storage held by a live tensor (or a storage object)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch.distributed aliases warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, (torch.Tensor, torch.UntypedStorage))]
    for obj in objects:
        try:
            if isinstance(obj, torch.Tensor) and obj.layout == torch.strided:
                storage = obj.untyped_storage()
            elif isinstance(obj, torch.UntypedStorage):
                storage = obj
            else:
                continue
        except (RuntimeError, ReferenceError):
            continue
        if storage.device.type == "cpu" and storage.nbytes():
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
    return sum(seen.values())


@pytest.mark.parametrize("loop", ["zero_grad()", "zero_grad(set_to_none=False)"])
def test_persistent_memory_equals_torchs(loop):
    """Between steps ours holds what torch holds: params, state, the grads in the loop
    that keeps them, and nothing else of size (the hyperparameters: a few bytes)."""
    held = {}
    for who in ("torch", "ours"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(6)])
        opt = OPTIMIZERS[who](model.parameters(), lr=1e-3, momentum=0.5, centered=True)
        before = _live_bytes()
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            opt.zero_grad(set_to_none=(loop == "zero_grad()"))
            model(torch.randn(2, 64, generator=g)).sum().backward()
            opt.step()
        opt.zero_grad(set_to_none=(loop == "zero_grad()"))
        held[who] = _live_bytes() - before
        del model, opt
    params = 6 * (64 * 64 + 64) * 4
    assert held["torch"] >= 3 * params  # three state buffers at least
    assert abs(held["ours"] - held["torch"]) <= 4096, held
