"""Show the graph dumps of one NpuFusedRMSprop step.

    python examples/debug_graphs.py [--out DIR]

Writes, per compiled graph: the Dynamo graph, the aten graph before and after the
foreach-fusion pass, the backend's generated code and a summary; then prints this run's
folders (never an earlier run's, when ``--out`` already holds some) and the fused
graph. Without ``--out`` the files go to a new temporary folder, printed at the end.
The same works for code you cannot edit:
``NPU_OPTIM_COMPILE_DUMP_DIR=graph_dumps python train.py``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from npu_optim_compile import NpuFusedRMSprop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the dumps (default: a new temporary folder)")
    given = parser.parse_args().out
    out = Path(given) if given else Path(tempfile.mkdtemp(prefix="npu_optim_graph_dumps_"))
    earlier = set(out.iterdir()) if out.is_dir() else set()

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = NpuFusedRMSprop(model.parameters(), lr=1e-3, momentum=0.9, centered=True, dump_dir=out)
    model(torch.randn(8, 64)).sum().backward()
    opt.step()

    for folder in sorted(set(out.iterdir()) - earlier):  # this run's folders only
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
    print(f"\nthe graph files of this run are under {out.resolve()}")


if __name__ == "__main__":
    main()
