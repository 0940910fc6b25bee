"""The examples run as written (in a subprocess, from the repository root)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run_example(*args: str, cwd: Path = ROOT) -> str:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def run_train(*args: str) -> str:
    """examples/train.py with ``args``; its stdout. It must not warn about dropped profiler ranges."""
    out = subprocess.run([sys.executable, "examples/train.py", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout}\n{out.stderr}"
    assert "Profiler record function" not in out.stderr + out.stdout, out.stderr
    return out.stdout


def train_tables(out: str) -> dict[str, dict[str, list[float]]]:
    """workload -> method -> [first call s, iteration median, q1, q3, step median, q1, q3] (ms;
    the step's three missing where it has no time of its own)."""
    tables: dict[str, dict[str, list[float]]] = {}
    rows = None
    for line in out.splitlines():
        if line.startswith("== ") and line.endswith(" =="):
            rows = tables.setdefault(line.strip("= "), {})
        elif rows is not None and line.startswith("  ") and " s  " in line and not line.startswith("  ms:"):
            name, _, numbers = line.strip().partition("  ")
            values = numbers.replace("[", " ").replace("]", " ").replace("-", " ").replace(" s ", " ").split()
            rows[name.strip()] = [float(v) for v in values]
    return tables


def test_train_times_small_and_large_workloads_side_by_side():
    out = run_train("--steps", "20", "--workloads", "small,large")
    tables = train_tables(out)
    methods = {"NpuFusedRMSprop", "torch.optim.RMSprop(foreach=True)", "torch.compile(opt.step)"}
    assert set(tables) == {"small", "large"} and all(set(t) == methods for t in tables.values()), out
    for table in tables.values():
        for first, it, it_q1, it_q3, step, step_q1, step_q3 in table.values():
            assert first > 0 and 0 < it_q1 <= it <= it_q3 and 0 < step_q1 <= step <= step_q3 and step < it, out
    # which is which, and why, in the output
    assert "expected: the fused step does NOT matter here" in out.split("== large ==")[0]
    assert "expected: the fused step matters here" in out.split("== large ==")[1]
    assert out.count("measured: torch.optim.RMSprop(foreach=True): iteration") == 2
    assert "torch.compile(opt.step): the first call compiles" in out  # says what compiles, and how long
    assert "OK: loss fell: mean of the first 10 steps" in out


def test_train_many_tensors_and_the_compiled_train_step():
    out = run_train("--steps", "20", "--workloads", "many,compiled", "--skip-torch-compile")
    tables = train_tables(out)
    assert set(tables["many"]) == {"NpuFusedRMSprop", "torch.optim.RMSprop(foreach=True)"}, out
    assert set(tables["compiled"]) == {"compile_train_step, NpuFusedRMSprop",
                                       "torch.compile(train_step), NpuFusedRMSprop"}, out
    assert all(len(v) == 4 and v[0] > 0 and v[2] <= v[1] <= v[3] for v in tables["compiled"].values()), out
    assert "many: 204 tensors" in out and "compiled train step" in out


def test_train_rejects_too_few_steps_for_its_loss_check():
    out = subprocess.run([sys.executable, "examples/train.py", "--steps", "12"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 2 and "--steps 12: at least 20" in out.stderr, out.stderr


def test_train_interleaves_its_methods_in_blocks(monkeypatch):
    """The timing schedule itself: every method warms up first, then the methods take
    turns in blocks (the order rotating), each on the batches in step order."""
    spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
    train = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, train)  # its dataclasses look their module up
    spec.loader.exec_module(train)
    calls: list[tuple[str, int]] = []
    batches = {}

    def fake(name, workload):
        def iteration(xb, yb):
            calls.append((name, batches[id(xb)]))
            return torch.zeros(()), 0.0

        return train.Method(name, "", None, iteration)

    def make_batches(workload, steps):
        out = [(torch.zeros(1), torch.zeros(1)) for _ in range(steps)]
        batches.update({id(xb): i for i, (xb, _) in enumerate(out)})
        return out

    train.methods_of = lambda *args: [(name, fake) for name in "abc"]
    train.make_batches = make_batches
    methods = train.measure(train.WORKLOADS["small"], 27, True, True)
    w, b = train.WARMUP, train.BLOCK
    assert calls[: 3 * w] == [(n, i) for n in "abc" for i in range(w)]
    timed = calls[3 * w:]
    runs = [(timed[i][0], len(list(g))) for i, g in _runs(timed)]
    assert [n for n, _ in runs[:6]] == ["a", "b", "c", "b", "c", "a"]  # blocks, the order rotating
    assert all(length == b for _, length in runs[:-3]) and all(length == 2 for _, length in runs[-3:])
    for m in methods:
        assert [i for n, i in calls if n == m.name] == list(range(27)) and len(m.iterations) == 27 - w


def _runs(seq):
    """(start index, items) of each run of equal names."""
    import itertools

    i = 0
    for _, group in itertools.groupby(seq, key=lambda c: c[0]):
        items = list(group)
        yield i, items
        i += len(items)


def test_npu_quickstart_matches_torch():
    assert "OK: NpuFusedRMSprop matches torch.optim.RMSprop" in run_example("examples/npu_quickstart.py")


def test_debug_graphs_shows_the_dumps_of_this_run_only(tmp_path):
    """Without --out it writes into a new temporary folder (nothing in the working
    directory); a second run into that same folder lists only its own graph folders."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    out = run_example(str(ROOT / "examples/debug_graphs.py"), cwd=cwd)
    assert "aten_after_fusion.py" in out and "torch.ops.aten.sqrt.default" in out
    assert not any(cwd.iterdir()), sorted(cwd.iterdir())
    folder = Path(out.strip().splitlines()[-1].split(" are under ", 1)[1])
    try:
        first = {p.name for p in folder.iterdir()}
        assert first and all(name in out for name in first)
        again = run_example(str(ROOT / "examples/debug_graphs.py"), "--out", str(folder), cwd=cwd)
        new = {p.name for p in folder.iterdir()} - first
        assert new and all(name in again for name in new)
        assert not any(name in again for name in first), again
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_every_example_has_a_docstring_with_its_command(script):
    text = (ROOT / "examples" / script).read_text()
    assert text.startswith('"""') and f"examples/{script}" in text.split('"""')[1]
