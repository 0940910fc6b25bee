"""torch_npu's NpuFusedRMSprop example, on an Ascend NPU when there is one, else the CPU.

The setup of torch_npu's documented example: fp32 and fp16 parameters, the last one
never gets a gradient, ``eps=0.001, lr=0.01, weight_decay=1e-5``, mixed precision with
GradScaler. The result is checked against torch.optim.RMSprop given the same unscaled
gradients; exits non-zero on a mismatch.

    python examples/npu_quickstart.py
"""

from __future__ import annotations

import sys

import torch

from npu_optim_compile import NpuFusedRMSprop
from npu_optim_compile._npu import npu_available, npu_status

OPTIONS = dict(lr=0.01, eps=0.001, weight_decay=1e-5)


def make_params(device: str) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes_dtypes = [((16, 8), torch.float32), ((8,), torch.float32), ((8, 4), torch.float16),
                     ((4,), torch.float16), ((3, 3), torch.float32)]  # the last: never a grad
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=d)) for s, d in shapes_dtypes]


def grads_for(step: int, params) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) for p in params[:-1]]


def main() -> int:
    device = "npu" if npu_available() else "cpu"
    print(f"device: {device}" + ("" if device == "npu" else f"  ({npu_status().reason})"))
    ours_params, ref_params = make_params(device), make_params(device)
    opt = NpuFusedRMSprop(ours_params, **OPTIONS)
    ref = torch.optim.RMSprop(ref_params, **OPTIONS)
    # On an NPU this is torch_npu's GradScaler (its legacy fused-optimizer contract);
    # both hand NpuFusedRMSprop the scale and the inf flag for its compiled step.
    scaler = torch.npu.amp.GradScaler() if device == "npu" else torch.amp.GradScaler(device)

    skipped = 0
    for step in range(10):
        grads = grads_for(step, ours_params)
        # loss = sum(<p, g>): its gradient is g; scaled as AMP does
        loss = sum((p.float() * g.to(device)).sum() for p, g in zip(ours_params, grads))
        opt.zero_grad()
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        scaler.step(opt)  # skipped inside the compiled step if an fp16 grad overflowed
        scaler.update()
        if scaler.get_scale() < scale:  # the scaler backed off: this step was skipped
            skipped += 1
            continue
        for p, g in zip(ref_params, grads):
            p.grad = g.to(device=device, dtype=p.dtype)
        ref.step()
    print(f"steps skipped for overflowing fp16 grads (scale backed off): {skipped}")

    worst = 0.0
    for i, (p, q) in enumerate(zip(ours_params, ref_params)):
        tol = 1e-5 if p.dtype == torch.float32 else 2e-3
        diff = (p.detach().double() - q.detach().double()).abs().max().item()
        worst = max(worst, diff / tol)
        print(f"param {i} ({str(p.dtype).removeprefix('torch.')}, {tuple(p.shape)}): max |ours - torch| = {diff:.2e}")
    untouched = torch.equal(ours_params[-1].detach().cpu(), make_params("cpu")[-1].detach())
    print(f"last param without a grad untouched: {untouched}; loss scale now {scaler.get_scale():g}")
    if worst > 1 or not untouched:
        print("FAIL: NpuFusedRMSprop differs from torch.optim.RMSprop", file=sys.stderr)
        return 1
    print("OK: NpuFusedRMSprop matches torch.optim.RMSprop")
    return 0


if __name__ == "__main__":
    sys.exit(main())
