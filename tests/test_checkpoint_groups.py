"""Param groups in a checkpoint: what clients put into them comes back into the same optimizer, or the
save is refused naming the group and key before any file is written.

Found by saving the groups other code leaves: a scheduler computing in numpy float32 (np.float32 lr),
torch's tensor betas, timm's ``lr_scale``/``param_names``, a user's ``name``. Before, an np.float32
or a tensor inside a tuple failed in the JSON writer after every tensor file was written, naming
nothing; a 2-element tensor was written and then refused by the load into the same optimizer.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

import dist8
import dist8.checkpoint as ck


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))


def _optimizer(model, extra, **kw):
    groups = [{"params": list(model[0].parameters()), **extra}, {"params": list(model[1].parameters())}]
    return dist8.AdamW8bit(groups, **{"lr": 1e-2, "min_8bit_size": 0, **kw})


def _step(model, opt):
    opt.zero_grad()
    model(torch.randn(4, 32)).pow(2).mean().backward()
    opt.step()


STORABLE = {
    "np.float32 lr (a numpy scheduler)": ({"lr": np.float32(1e-3)}, {}),
    "np.int64 and np.float64": ({"layer_id": np.int64(3), "lr_scale": np.float64(0.25)}, {}),
    "np.bool_": ({"frozen": np.bool_(True)}, {}),
    "tensor betas (torch's API)": ({}, {"betas": (torch.tensor(0.9), torch.tensor(0.99))}),
    "one-element tensor lr of shape (1,)": ({}, {"lr": torch.tensor([1e-3])}),
    "timm's keys": ({"lr_scale": 0.5, "param_names": ["0.weight", "0.bias"], "name": "encoder"}, {}),
    "tuple, None, bool, big int": ({"tup": (1, 2.5), "opt": None, "frozen": False, "big": 10 ** 30}, {}),
}


@pytest.mark.parametrize("case", list(STORABLE))
def test_group_values_clients_leave_come_back_into_the_same_optimizer(tmp_path, case):
    extra, kw = STORABLE[case]
    model = _model()
    opt = _optimizer(model, extra, **kw)
    _step(model, opt)
    ck.save(tmp_path / "ck", model, opt, step=1)
    # the fresh optimizer's numbers differ: the checkpoint's must replace them
    fresh = _optimizer(model, {k: (0 if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else v)
                               for k, v in extra.items()}, **kw)
    ck.load(tmp_path / "ck", model, fresh)
    for gi, (got, want) in enumerate(zip(fresh.param_groups, opt.param_groups)):
        for key, value in want.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):  # stays a tensor of its shape
                assert isinstance(got[key], torch.Tensor) and got[key].shape == value.shape, (gi, key)
                assert torch.equal(got[key], value), (gi, key)
            elif isinstance(value, tuple) and any(isinstance(v, torch.Tensor) for v in value):
                assert [float(v) for v in got[key]] == [float(v) for v in value], (gi, key)
            else:
                assert got[key] == (list(value) if isinstance(value, tuple) and isinstance(got[key], list) else value), \
                    (gi, key)
    _step(model, fresh)  # and it steps


NOT_STORABLE = {
    "a 2-element tensor": {"ema": torch.tensor([1.0, 2.0])},
    "NaN": {"best": float("nan")},
    "np.float32 inf": {"best": np.float32("inf")},
    "a dict": {"meta": {"layer": 3}},
    "a nested list": {"nl": [[1, 2], [3]]},
    "a set": {"s": {1, 2}},
    "a function": {"fn": print},
    "a tensor in a list": {"pair": [torch.tensor([1.0, 2.0]), 1.0]},
}


@pytest.mark.parametrize("case", list(NOT_STORABLE))
def test_group_values_a_checkpoint_cannot_hold_are_refused_before_anything_is_written(tmp_path, case):
    extra = NOT_STORABLE[case]
    model = _model()
    opt = _optimizer(model, extra)
    _step(model, opt)
    key = next(iter(extra))
    with pytest.raises(ValueError, match=rf"^param group 0 key '{key}' holds .*, which a checkpoint cannot store"):
        ck.save(tmp_path / "ck", model, opt, step=1)
    assert os.listdir(tmp_path) == []  # no directory, no temporary files
    with pytest.raises(ValueError, match=rf"^param group 0 key '{key}' holds "):
        ck.save(tmp_path / "run", model, opt, step=1, keep_last=2)
    assert os.listdir(tmp_path) == []


def test_a_parameter_in_another_group_than_at_save_is_refused_naming_it(tmp_path):
    """Each group's values load by its position: a parameter moved to another group since the save trained with
    that group's lr and weight decay, silently (0.024 off the uninterrupted run in three steps). torch's
    load_state_dict refuses such a regrouping; so does the checkpoint load now, changing nothing."""
    model = _model()
    opt = _optimizer(model, {"lr": 3e-3, "weight_decay": 0.0})
    _step(model, opt)
    path = ck.save(tmp_path / "ck", model, opt)
    regrouped = dist8.AdamW8bit([{"params": [*model[0].parameters(), model[1].weight]},
                                 {"params": [model[1].bias]}], lr=1e-2, min_8bit_size=0)
    before = [dict(g, params=None) for g in regrouped.param_groups]
    with pytest.raises(ck.CheckpointError, match="parameter 1.weight is in param group 0 here but was saved in "
                                                 "group 1"):
        ck.load(path, model, regrouped)
    assert not regrouped.state and [dict(g, params=None) for g in regrouped.param_groups] == before
    ck.load(path, model, _optimizer(model, {}))  # the same split loads


def _stepped(model, opt, steps=2):
    for _ in range(steps):
        model(torch.ones(2, 64)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def test_a_load_that_changes_a_state_kind_key_warns_as_load_state_dict_does(tmp_path):
    """checkpoint.load replaced optim_bits/min_8bit_size by the saved values without the warning
    load_state_dict gives (found by an outside probe)."""
    torch.manual_seed(0)
    model = nn.Linear(64, 64)
    opt = dist8.AdamW8bit(model.parameters(), min_8bit_size=0)
    _stepped(model, opt)
    ck.save(tmp_path / "ck", model, opt, step=2)
    loader = dist8.AdamW8bit(model.parameters(), min_8bit_size=100_000)
    with pytest.warns(UserWarning, match=r"^the loaded state dict's param group has min_8bit_size=0 \(this "
                                         r"optimizer: 100000\): loaded values replace the optimizer's"):
        ck.load(tmp_path / "ck", model, loader)
    assert loader.param_groups[0]["min_8bit_size"] == 0


@pytest.mark.parametrize("saved_bits, loading_bits", [(8, 32), (32, 8)])
def test_state_of_the_other_kind_than_an_override_gives_is_refused_at_load(tmp_path, saved_bits, loading_bits):
    """A checkpoint whose parameter holds 8-bit state, loaded where an override gives it 32-bit state (or the
    reverse), was installed with the model's weights and refused only at the next step()."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))

    def make(bits):
        return dist8.AdamW8bit(model.named_parameters(), min_8bit_size=0, overrides={"0.weight": {"optim_bits": bits}})

    opt = make(saved_bits)
    _stepped(model, opt)
    ck.save(tmp_path / "ck", model, opt, step=2)
    weights = model[0].weight.detach().clone()
    loader = make(loading_bits)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    kinds = {8: "8-bit", 32: "32-bit"}
    with pytest.raises(ck.CheckpointError, match=rf"state of parameter 0.weight is {kinds[saved_bits]}, but the "
                                                 rf"optimizer keeps {kinds[loading_bits]} state for it"):
        ck.load(tmp_path / "ck", model, loader)
    assert not loader.state and torch.equal(model[0].weight, weights + 1.0)  # nothing loaded
