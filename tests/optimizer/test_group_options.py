"""What a param group must hold, side by side with torch.optim.RMSprop (issue 18 items 1-3).

torch raises ``TypeError`` for a ``None`` hyperparameter, ``KeyError`` for a group that
lacks one of its keys (one appended to ``param_groups`` by hand, or with a key deleted)
and, on the CPU, for ``capturable=True``. Ours raises the same instead of stepping with
0 or with the library's defaults, and leaves params and state as they were.
"""

from __future__ import annotations

import pytest
import torch

from parity import TOLERANCES, assert_same_state, clone_params, make_params, set_grads
from npu_optim_compile import NpuFusedRMSprop, NpuFusedRMSpropTF

HYPERPARAMETERS = ("lr", "alpha", "eps", "weight_decay", "momentum")
#: torch's group keys, from torch itself
TORCH_KEYS = sorted(set(torch.optim.RMSprop([torch.zeros(1)]).param_groups[0]) - {"params"})


def both(**kwargs):
    """(ours, torch's, our params, torch's params) after one step on the same grads."""
    po = make_params()
    pr = clone_params(po)
    ours, ref = NpuFusedRMSprop(po, backend="eager", **kwargs), torch.optim.RMSprop(pr, **kwargs)
    set_grads(0, po, pr)
    ours.step()
    ref.step()
    set_grads(1, po, pr)
    return ours, ref, po, pr


def raises_like_torch(ours, ref, po, error):
    """Both steps raise ``error`` (KeyError: the same key); ours changed nothing."""
    before = [p.detach().clone() for p in po]
    state = [{k: v.clone() for k, v in ours.state[p].items()} for p in po]
    with pytest.raises(error) as theirs:
        ref.step()
    with pytest.raises(error) as mine:
        ours.step()
    if error is KeyError:
        assert mine.value.args == theirs.value.args
    for p, b, s in zip(po, before, state):
        assert torch.equal(p.detach(), b)
        assert all(torch.equal(ours.state[p][k], v) for k, v in s.items())
    return mine.value


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_none_hyperparameter_at_construction_raises_type_error_as_torch(name):
    with pytest.raises(TypeError):
        torch.optim.RMSprop(make_params(), **{name: None})
    with pytest.raises(TypeError, match=f"Invalid {name} value: None"):
        NpuFusedRMSprop(make_params(), **{name: None})


@pytest.mark.parametrize("name", HYPERPARAMETERS)
def test_none_hyperparameter_in_a_group_raises_type_error_as_torch(name):
    ours, ref, po, _ = both(momentum=0.5)
    ours.param_groups[0][name] = ref.param_groups[0][name] = None
    error = raises_like_torch(ours, ref, po, TypeError)
    assert f"Invalid {name} value: None" in str(error)


def test_none_in_a_group_given_at_construction_raises():
    with pytest.raises(TypeError, match="Invalid lr value: None"):
        NpuFusedRMSprop([{"params": make_params(), "lr": None}])


def test_group_appended_by_hand_raises_key_error_as_torch():
    ours, ref, po, pr = both()
    extra_o, extra_r = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    ours.param_groups.append({"params": [extra_o]})
    ref.param_groups.append({"params": [extra_r]})
    extra_o.grad, extra_r.grad = torch.ones(3), torch.ones(3)
    assert str(raises_like_torch(ours, ref, po, KeyError)) == "'capturable'"


@pytest.mark.parametrize("key", TORCH_KEYS)
def test_group_with_a_torch_key_deleted_raises_key_error_as_torch(key):
    ours, ref, po, _ = both()
    del ours.param_groups[0][key], ref.param_groups[0][key]
    assert raises_like_torch(ours, ref, po, KeyError).args == (key,)


def test_group_with_a_variant_key_deleted_raises_key_error():
    """The optimizer's own variant keys are required like torch's: a TF-style group
    whose ``eps_in_sqrt`` was deleted would otherwise run torch's eps placement."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = NpuFusedRMSpropTF([p], backend="eager")
    p.grad = torch.ones(3)
    opt.step()
    del opt.param_groups[0]["eps_in_sqrt"]
    with pytest.raises(KeyError, match="eps_in_sqrt"):
        opt.step()


def test_torch_complete_group_appended_to_a_default_optimizer_steps_as_torch():
    """A default optimizer's groups hold torch's keys only: a group appended with those
    keys is complete, and steps exactly as torch's."""
    po, extra = make_params(), torch.nn.Parameter(torch.randn(4))
    pr, extra_r = clone_params(po), torch.nn.Parameter(extra.detach().clone())
    ours, ref = NpuFusedRMSprop(po, backend="eager"), torch.optim.RMSprop(pr)
    keys = {k: v for k, v in ref.param_groups[0].items() if k != "params"}
    ours.param_groups.append({"params": [extra], **dict(keys, lr=0.05)})
    ref.param_groups.append({"params": [extra_r], **dict(keys, lr=0.05)})
    for step in range(5):
        set_grads(step, po + [extra], pr + [extra_r])
        ours.step()
        ref.step()
    assert_same_state(ours, ref, po + [extra], pr + [extra_r], **TOLERANCES[torch.float32])


def test_capturable_true_raises_as_torch_on_the_cpu():
    ours, ref, po, _ = both()
    ours.param_groups[0]["capturable"] = ref.param_groups[0]["capturable"] = True
    with pytest.raises(AssertionError, match="capturable=True"):
        ref.step()
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        ours.step()
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        NpuFusedRMSprop([{"params": make_params(), "capturable": True}])


def test_differentiable_true_in_a_group_raises():
    """torch differentiates through its step only with ``differentiable=True``; ours
    cannot (in-place updates of flat buffers under no_grad), so it says so."""
    ours, _, _, _ = both()
    ours.param_groups[0]["differentiable"] = True
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        ours.step()


@pytest.mark.parametrize("entry", [{"foreach": True}, {"foreach": False}, {"fused": True}, {"fused": False}],
                         ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()))
def test_foreach_and_fused_keys_step_as_torch(entry):
    """``foreach`` only picks torch's implementation (same numbers) and torch ignores a
    ``fused`` key: both step as before."""
    ours, ref, po, pr = both(momentum=0.5)
    ours.param_groups[0].update(entry)
    ref.param_groups[0].update(entry)
    ours.step()
    ref.step()
    assert_same_state(ours, ref, po, pr, **TOLERANCES[torch.float32])
