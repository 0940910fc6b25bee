"""Scenarios run in 2 real gloo processes, and the one-process references they must equal.

``launch(names, out_dir)`` spawns 2 processes that rendezvous through a FileStore in
``out_dir``; each runs every named scenario in turn and rank 0 saves what the test
compares (full params, flags) to ``out_dir/<name>.pt``. A scenario that raises saves
its traceback instead, so one broken engine fails its own test only.

Every scenario trains the same small model on the same global batch, split evenly
between the ranks. With a mean loss, the gradient averaged over the ranks is the
one-process gradient on the whole batch, so the reference is torch.optim.RMSprop in one
process (:func:`reference`).
"""

from __future__ import annotations

import datetime
import os
import traceback

import torch
import torch.distributed as dist

STEPS = 4
BATCH = 8  # global; each of the 2 ranks sees half
WORLD = 2
KWARGS = dict(lr=0.01, alpha=0.9, momentum=0.5, centered=True, weight_decay=0.01)


def make_model() -> torch.nn.Module:
    # Linear(8, 3): 3 rows do not split evenly over 2 ranks (FSDP2 pads the last shard).
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(step: int, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, 6, generator=g), torch.randn(BATCH, 3, generator=g)
    if rank is None:
        return x, y
    half = BATCH // WORLD
    return x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]


def train(model, opt, rank: int | None, steps: int = STEPS) -> None:
    for step in range(steps):
        x, y = batch(step, rank)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def reference(kwargs=KWARGS) -> list[torch.Tensor]:
    """torch.optim.RMSprop in one process on the whole batch."""
    model = make_model()
    train(model, torch.optim.RMSprop(model.parameters(), **kwargs), None)
    return [p.detach().clone() for p in model.parameters()]


# -- scenarios (run on every rank; rank 0's return value is saved) ----------------------


def _ours(params, backend="eager", **kwargs):
    from npu_optim_compile import NpuFusedRMSprop

    return NpuFusedRMSprop(params, backend=backend, **{**KWARGS, **kwargs})


def _layout_facts(opt) -> dict:
    """Which of the optimizer's params went to buckets (one fused call each) and which
    stayed loose; how many were combined into flat buffers; and whether
    zero_grad(set_to_none=False) kept every grad object (it re-points only combined
    params' grads into their flat grad buffer, never grads another engine owns)."""
    plans = list(opt._engine.plans().values())
    params = [p for plan in plans for p in plan.params]
    before = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    combiner = opt._engine.combiner
    return {
        "bucketed": sum(len(b.params) for plan in plans for b in plan.buckets),
        "loose": sum(len(plan.loose) for plan in plans),
        "combined": sum(len(c.params) for c in combiner.chunks) if combiner is not None else 0,
        "grads_kept": all(p.grad is g for p, g in zip(params, before)),
    }


def _ddp(gradient_as_bucket_view: bool, backend: str, rank: int, **kwargs) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model(), gradient_as_bucket_view=gradient_as_bucket_view)
    opt = _ours(model.parameters(), backend=backend, **kwargs)
    train(model, opt, rank)
    return {"params": [p.detach().clone() for p in model.parameters()], **_layout_facts(opt)}


def ddp_grads_copied(rank):
    return _ddp(False, "eager", rank)


def ddp_bucket_view(rank):
    return _ddp(True, "eager", rank)


def ddp_bucket_view_inductor(rank):
    return _ddp(True, "inductor", rank)


def ddp_combined(rank):
    return _ddp(False, "eager", rank, combine_params=True)


def ddp_bucket_view_combined(rank):
    return _ddp(True, "eager", rank, combine_params=True)


def _zero(parameters_as_bucket_view: bool, rank: int, **kwargs) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from npu_optim_compile import NpuFusedRMSprop

    model = DDP(make_model())
    opt = ZeroRedundancyOptimizer(
        model.parameters(),
        optimizer_class=NpuFusedRMSprop,
        parameters_as_bucket_view=parameters_as_bucket_view,
        backend="eager",
        **KWARGS,
        **kwargs,
    )
    train(model, opt, rank)
    local = opt.optim
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "local_params": sum(len(g["params"]) for g in local.param_groups),
        **_layout_facts(local),
    }


def zero(rank):
    return _zero(False, rank)


def zero_bucket_view(rank):
    return _zero(True, rank)


def zero_bucket_view_combined(rank):
    return _zero(True, rank, combine_params=True)


def fsdp2(rank, out_dir):
    """Ours and torch.optim.RMSprop, each on its own fully_shard'ed copy of the model; then
    a DCP checkpoint of our optimizer, restored into a fresh copy, takes the same step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded():
        model = make_model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    ours_model, torch_model = sharded(), sharded()
    local_before = [p.to_local() for p in ours_model.parameters()]
    ptrs_before = [t.untyped_storage().data_ptr() for t in local_before]
    ours = _ours(ours_model.parameters())
    theirs = torch.optim.RMSprop(torch_model.parameters(), **KWARGS)
    train(ours_model, ours, rank)
    train(torch_model, theirs, rank)

    state_diffs, state_types = [], set()
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        for key, ref in theirs.state[q].items():
            mine = ours.state[p][key]
            state_types.add((key, type(mine).__name__, type(ref).__name__))
            if isinstance(ref, DTensor):
                assert mine.placements == ref.placements, (key, mine.placements, ref.placements)
                mine, ref = mine.full_tensor(), ref.full_tensor()
            state_diffs.append((mine.double() - ref.double()).abs().max().item())
    result = {
        "params": [p.full_tensor().detach().clone() for p in ours_model.parameters()],
        "torch_params": [p.full_tensor().detach().clone() for p in torch_model.parameters()],
        "param_types": sorted({type(p).__name__ for p in ours_model.parameters()}),
        "state_types": sorted(state_types),
        "max_state_diff": max(state_diffs),
        # FSDP2 still owns the local shards: same storage before and after our steps.
        "same_storage": ptrs_before
        == [p.to_local().untyped_storage().data_ptr() for p in ours_model.parameters()],
        **_layout_facts(ours),
    }
    result["restored_step_diff"] = _dcp_round_trip(ours_model, ours, sharded, rank, out_dir)
    return result


def _dcp_round_trip(model, opt, make_sharded, rank, out_dir) -> float:
    """Save ``opt`` with torch.distributed.checkpoint, load it into a fresh sharded copy,
    take one more step with both; return the largest param difference after it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    path = os.path.join(out_dir, "dcp")
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    fresh = make_sharded()
    with torch.no_grad():
        for p, q in zip(fresh.parameters(), model.parameters()):
            p.to_local().copy_(q.to_local())
    fresh_opt = _ours(fresh.parameters())
    loaded = {"optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(loaded, checkpoint_id=path)
    set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"])
    train(model, opt, rank, steps=1)
    train(fresh, fresh_opt, rank, steps=1)
    return max(
        (p.full_tensor() - q.full_tensor()).abs().max().item() for p, q in zip(fresh.parameters(), model.parameters())
    )


SCENARIOS = {
    f.__name__: f
    for f in (
        ddp_grads_copied,
        ddp_bucket_view,
        ddp_bucket_view_inductor,
        ddp_combined,
        ddp_bucket_view_combined,
        zero,
        zero_bucket_view,
        zero_bucket_view_combined,
        fsdp2,
    )
}


# -- process launch ---------------------------------------------------------------------


def _worker(rank: int, names: list[str], out_dir: str) -> None:
    store = os.path.join(out_dir, "filestore")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        for name in names:
            try:
                fn = SCENARIOS[name]
                result = fn(rank, out_dir) if fn is fsdp2 else fn(rank)
            except Exception:  # recorded for the test; the other rank fails the same way
                result = {"error": traceback.format_exc()}
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{name}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(names: list[str], out_dir: str) -> dict[str, dict]:
    """Run the named scenarios in 2 spawned processes; return rank 0's results by name."""
    torch.multiprocessing.spawn(_worker, args=(names, out_dir), nprocs=WORLD, join=True)
    return {name: torch.load(os.path.join(out_dir, f"{name}.pt"), weights_only=False) for name in names}
