"""Show the graph dumps of one NpuFusedRMSprop step.

    python examples/debug_graphs.py [--out graph_dumps]

Writes, per compiled graph: the Dynamo graph, the aten graph before and after the
foreach-fusion pass, the backend's generated code and a summary; then prints the folder
and the fused graph. The same works for code you cannot edit:
``NPU_OPTIM_COMPILE_DUMP_DIR=graph_dumps python train.py``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from npu_optim_compile import NpuFusedRMSprop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="graph_dumps")
    out = Path(parser.parse_args().out)

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = NpuFusedRMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True, dump_dir=out)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()

    for folder in sorted(out.iterdir()):
        summary = json.loads((folder / "summary.json").read_text())
        print(f"{folder}/")
        for f in sorted(folder.iterdir()):
            print(f"    {f.name:28s} {f.stat().st_size:8,d} bytes")
        print(f"  buckets: {[(b['dtype'], b['tensors'], b['elements']) for b in summary['buckets']]}")
        print(f"  aten ops before/after the pass: {summary['ops_before_fusion']} / {summary['ops_after_fusion']}"
              f" ({summary['foreach_ops_rewritten']} foreach ops rewritten), kernels: {summary.get('kernels_expected')},"
              f" compile {summary['compile_seconds']} s")
        body = (folder / "aten_after_fusion.py").read_text().splitlines()
        ops = [line.strip() for line in body if "torch.ops.aten" in line]
        print("  the fused graph:\n" + "\n".join(f"    {line.split('=', 1)[1].strip()[:90]}" for line in ops))


if __name__ == "__main__":
    main()
