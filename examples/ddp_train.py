"""Data-parallel training with NpuFusedRMSprop under DistributedDataParallel (gloo, CPU).

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 200] [--zero]
        [--gradient-as-bucket-view] [--backend auto|inductor|eager]

Each rank trains on its own slice of every batch; DDP averages the grads, so every rank
takes the same step. ``--zero`` shards the optimizer state with
``ZeroRedundancyOptimizer(optimizer_class=NpuFusedRMSprop)``. Rank 0 prints the loss;
at the end the ranks check that they hold identical params. Exits non-zero if they do
not, or if the loss did not fall.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

from npu_optim_compile import NpuFusedRMSprop


def make_model() -> torch.nn.Module:
    torch.manual_seed(1)  # the same initial params on every rank (DDP also broadcasts)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)
    )


def global_batch(step: int, size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(size, 32, generator=g)
    y = torch.sin(x[:, :1] * 3) + 0.1 * (x**2).sum(1, keepdim=True)
    return x, y


def params_agree(model: torch.nn.Module) -> bool:
    """Whether every rank holds rank 0's params, bit for bit."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    agree = torch.tensor([int(torch.equal(flat, ref))])
    dist.all_reduce(agree, op=dist.ReduceOp.MIN)
    return bool(agree.item())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--zero", action="store_true", help="shard the optimizer state (ZeRO-1)")
    parser.add_argument("--gradient-as-bucket-view", action="store_true")
    parser.add_argument("--backend", default="auto", help="NpuFusedRMSprop's backend")
    args = parser.parse_args(argv)

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model = DDP(make_model(), gradient_as_bucket_view=args.gradient_as_bucket_view)
    options = dict(lr=args.lr, momentum=0.9, centered=True, backend=args.backend)
    if args.zero:
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=NpuFusedRMSprop, **options)
    else:
        opt = NpuFusedRMSprop(model.parameters(), **options)

    losses = []
    for step in range(args.steps):
        x, y = global_batch(step)
        x, y = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's slice
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)
        if rank == 0 and step % max(1, args.steps // 10) == 0:
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)

    agree = params_agree(model)
    fell = losses[-1] < losses[0]
    if rank == 0:
        print(f"final loss {losses[-1]:.4f} (first {losses[0]:.4f}); params identical on {world} ranks: {agree}")
    # Free DDP's reducer while the process group is alive. Freed at interpreter exit
    # instead, it can drop the group's last reference and deadlock torch 2.13's gloo
    # teardown (its destructor joins a worker thread that waits for the GIL).
    del model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if agree and fell else 1


if __name__ == "__main__":
    sys.exit(main())
