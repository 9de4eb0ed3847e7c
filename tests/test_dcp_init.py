"""torch.distributed.checkpoint on an optimizer without state (a checkpoint taken before the first step, or
loaded into a fresh optimizer) leaves it as a fresh optimizer.

DCP's ``get/set_optimizer_state_dict`` give an optimizer without state some by one real ``step()`` with zero
gradients and every group's ``lr`` at 0 (``_init_optim_state``). For dist8 that step counted: every
``step`` became 1 (Adam's bias correction then ran a step ahead: the next update differed by a quarter of a
step at lr 1e-2), percentile clipping's history took zeros, ``ShardedOptimizer.steps_taken`` became 1, and a
parameter whose override carries its own ``lr`` took a real step with weight decay. It ran on the live
optimizer when a step-0 checkpoint was taken (``dist8.checkpoint.save`` of an FSDP2 model gathers through
DCP), and on the optimizer being loaded. Now the step makes each parameter's fresh state and nothing else
(``dist8.optim.dcp_init``): every run below continues bitwise as one that never saw DCP.
"""
import pytest
import torch

import dist8
import dist8.checkpoint as ckpt
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=100, percentile_clipping=5,
          overrides={"1.weight": {"lr": 3e-3}})  # an lr of its own: DCP's lr=0 never reached it


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 16))


def _train(model, opt, first, count):
    for step in range(first, first + count):
        x = torch.randn(4, 32, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _full(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for p in model.parameters()]


def _steps(opt, model):
    return sorted({st["step"] for st in (opt.state[p] for p in model.parameters()) if st})


def _worker(rank, world_size, how, root):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    def built():
        model = _model()
        if how == "fsdp2":
            for layer in model:
                fully_shard(layer)
            fully_shard(model)
            return model, dist8.AdamW8bit(model.named_parameters(), **KW)
        if how.startswith("sharded"):
            return model, ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=int(how[-1]), **KW)
        opt = dist8.AdamW8bit(model.named_parameters(), **KW)
        if how == "release":  # its step() steps gradients set by hand: DCP's zero ones too, before
            handles.append(dist8.gradient_release(model, opt))
        return model, opt

    handles = []
    model, opt = built()
    before = _full(model)
    if how == "fsdp2":
        path = ckpt.save(f"{root}/step0", model, opt, step=0)  # gathers through DCP
    saved = get_optimizer_state_dict(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(before, _full(model))), "the parameters moved"
    assert _steps(opt, model) in ([], [0]), _steps(opt, model)
    if how.startswith("sharded"):
        assert opt.steps_taken == 0
    loaded_model, loaded = built()
    set_optimizer_state_dict(loaded_model, loaded, saved, options=StateDictOptions(strict=False))
    assert _steps(loaded, loaded_model) in ([], [0])
    runs = [(model, opt), (loaded_model, loaded)]
    if how == "fsdp2":
        third_model, third = built()
        ckpt.load(path, third_model, third)
        runs.append((third_model, third))
    for m, o in runs:
        _train(m, o, 0, 3)
    return [_full(m) for m, _ in runs]


@pytest.mark.parametrize("how", ["plain", "release", "fsdp2", "sharded1", "sharded2"])
def test_dcp_on_an_optimizer_without_state_leaves_a_fresh_optimizer(tmp_path, how):
    ref_model = _model()
    ref = dist8.AdamW8bit(ref_model.named_parameters(), **KW)
    _train(ref_model, ref, 0, 3)
    want = [p.detach() for p in ref_model.parameters()]
    for runs in run_ranks(_worker, 2, how, str(tmp_path), tmp_path=tmp_path):
        for i, params in enumerate(runs):  # the same batch on every rank: averaged gradients are exact
            for n, (got, expected) in enumerate(zip(params, want)):
                assert torch.equal(got, expected), (how, i, n)


def _changed_worker(rank, world_size, how):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    model = _model()
    kw = dict(KW, percentile_clipping=100)
    if how == "fsdp2":
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
    if how.startswith("sharded"):
        opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=int(how[-1]), **kw)
    else:
        opt = dist8.AdamW8bit(model.named_parameters(), **kw)
    get_optimizer_state_dict(model, opt)  # fresh 8-bit state, step 0, on every parameter
    opt.param_groups[0]["optim_bits"] = 32  # then the settings change, before the first step
    opt.param_groups[0]["percentile_clipping"] = 5
    _train(model, opt, 0, 2)
    return _full(model)


@pytest.mark.parametrize("how", ["plain", "fsdp2", "sharded1"])
def test_state_dcp_made_before_the_first_step_follows_a_settings_change(tmp_path, how):
    """The state DCP's initialisation makes (step 0) holds nothing a step made: a change of optim_bits or
    percentile_clipping before the first step remakes it for the new settings, where it was refused as a change
    "after its first step" (which a fresh optimizer accepts), bitwise the optimizer built with those settings."""
    ref_model = _model()
    ref = dist8.AdamW8bit(ref_model.named_parameters(), **dict(KW, optim_bits=32, percentile_clipping=5))
    _train(ref_model, ref, 0, 2)
    for params in run_ranks(_changed_worker, 2, how, tmp_path=tmp_path):
        assert all(torch.equal(a, b) for a, b in zip(params, ref_model.parameters())), how
