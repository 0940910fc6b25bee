"""Property-based: random user actions between steps, checked against torch.optim.RMSprop
after every step (float64, eager backend: the engine's bookkeeping is what is tested;
the compiled kernel is the same for every layout and is tested elsewhere)."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from parity import TOLERANCES
from npu_optim_compile import NpuFusedRMSprop

TOL = TOLERANCES[torch.float64]
SHAPES = [(3, 4), (5,), (2, 3), (4,)]
KW = dict(lr=0.01, momentum=0.5, centered=True, weight_decay=0.01)

ACTIONS = (
    "repoint_grad",  # p.grad = a new tensor
    "grad_data_swap",  # p.grad.data = t
    "grad_set_",  # p.grad.set_(t)
    "zero_grad_none",  # zero_grad() (set_to_none=True)
    "zero_grad_keep",  # zero_grad(set_to_none=False)
    "lose_grad",  # p.grad = None (a branch not taken)
    "param_data_swap",  # p.data = t
    "state_data_swap",  # state[p]["square_avg"].data = t
    "save",  # keep a checkpoint
    "load",  # load the last checkpoint
    "add_group",  # add_param_group with a new param
)


def rand(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


class World:
    """One optimizer and its params, driven the same way as its twin."""

    def __init__(self, make):
        self.params = [torch.nn.Parameter(rand(s, i)) for i, s in enumerate(SHAPES)]
        self.opt = make(self.params)
        self.saved = None

    def backward(self, step, skip):
        """What autograd does: a fresh grad where there is none, else accumulate."""
        for i, p in enumerate(self.params):
            if i in skip:
                continue
            g = rand(p.shape, 1000 * step + i)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def act(self, action, i, seed):
        p = self.params[i % len(self.params)]
        if action == "repoint_grad" and p.grad is not None:
            p.grad = rand(p.shape, seed)
        elif action == "grad_data_swap" and p.grad is not None:
            p.grad.data = rand(p.shape, seed)
        elif action == "grad_set_" and p.grad is not None:
            p.grad.set_(rand(p.shape, seed))
        elif action == "zero_grad_none":
            self.opt.zero_grad()
        elif action == "zero_grad_keep":
            self.opt.zero_grad(set_to_none=False)
        elif action == "lose_grad":
            p.grad = None
        elif action == "param_data_swap":
            p.data = rand(p.shape, seed)
        elif action == "state_data_swap" and "square_avg" in self.opt.state.get(p, {}):
            self.opt.state[p]["square_avg"].data = rand(p.shape, seed).abs()
        elif action == "save":
            self.saved = copy.deepcopy(self.opt.state_dict())
        elif action == "load" and self.saved is not None and len(self.saved["param_groups"]) == len(self.opt.param_groups):
            self.opt.load_state_dict(copy.deepcopy(self.saved))
        elif action == "add_group" and len(self.params) < len(SHAPES) + 2:
            new = torch.nn.Parameter(rand((3,), seed))
            self.params.append(new)
            self.opt.add_param_group({"params": [new], "lr": 0.02})


def assert_same(ours: World, ref: World, where: str):
    for i, (p, q) in enumerate(zip(ours.params, ref.params)):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=lambda m: f"{where} param {i}: {m}")
        so, sr = ours.opt.state.get(p, {}), ref.opt.state.get(q, {})
        assert set(so) == set(sr), (where, i, sorted(so), sorted(sr))
        for key in sr:
            torch.testing.assert_close(so[key].double(), sr[key].double(), **TOL, msg=lambda m: f"{where} {i} {key}: {m}")


step_plan = st.tuples(
    st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7)), max_size=3),  # before backward
    st.lists(st.tuples(st.sampled_from(ACTIONS), st.integers(0, 7)), max_size=2),  # after backward
    st.sets(st.integers(0, 5), max_size=2),  # params without a grad this step
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step_plan, min_size=2, max_size=7))
def test_random_user_actions_match_torch(plan):
    ours = World(lambda ps: NpuFusedRMSprop(ps, backend="eager", **KW))
    ref = World(lambda ps: torch.optim.RMSprop(ps, **KW))
    for step, (before, after, skip) in enumerate(plan):
        for world in (ours, ref):
            for k, (action, i) in enumerate(before):
                world.act(action, i, seed=10_000 * step + 100 * k + i)
            world.backward(step, skip)
            for k, (action, i) in enumerate(after):
                world.act(action, i, seed=20_000 * step + 100 * k + i)
            world.opt.step()
        assert_same(ours, ref, f"after step {step} ({before}, {after}, skip {sorted(skip)})")
