"""ShardedOptimizer through torch.distributed.checkpoint (``get/set_optimizer_state_dict`` + ``dcp.save/load``).

Before: DCP's ``get_optimizer_state_dict`` failed on the default shard state dict (KeyError 'params');
with ``stage=1`` it also ran a real zero-gradient step on the trained optimizer first (its ``state``
looked empty: step counter + 1, moments decayed), and a fresh stage-2 optimizer gave DCP no state to
load into, so ``dcp.load`` loaded nothing, silently. With ``flatten_optimizer_state_dict=True``
(torchtitan's setting) ``set_optimizer_state_dict`` failed with a KeyError: torch reads
``optim.state[p]`` for every parameter, and a rank has state for its own pieces only.
"""
import os

import torch
from torch import nn

import dist8
from dist_utils import run_ranks


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 300), nn.GELU(), nn.Linear(300, 8))


def run(model, opt, first, last, rank):
    import torch.distributed as dist

    for s in range(first, last):
        x = torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * s + rank))
        model(x).square().mean().backward()
        if opt.stage == 1:  # stage 1 takes averaged gradients (DDP's job)
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        opt.step()
        opt.zero_grad()


def snapshot(opt):
    return {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in st.items()}
            for i, st in opt.shard_state().items()}


def same(a, b):
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(torch.equal(v, b[i][k]) if torch.is_tensor(v) else v == b[i][k]
                                           for k, v in a[i].items()) for i in a)


def _worker(rank, world_size, root):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    out = {}
    # flatten_optimizer_state_dict is torchtitan's setting: "state.<fqn>.<key>" entries, no "param_groups" list.
    for stage, flatten in ((1, False), (2, False), (2, True)):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        path = os.path.join(root, f"stage{stage}" + ("flat" if flatten else ""))
        model = make()
        opt = dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2, min_8bit_size=0)
        run(model, opt, 0, 2, rank)
        before = snapshot(opt)
        dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=path)
        opt.full_state_dict = True  # the whole state as the unsharded optimizer's dict (collective)
        out[f"full{stage}"] = opt.state_dict()["state"]
        opt.full_state_dict = False
        assert same(before, snapshot(opt)), f"stage {stage}: getting the state dict changed the state"
        if flatten:  # also the one-file way: a full state dict saved by rank 0, broadcast from it at load
            full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            other_model = make()
            other = dist8.ShardedOptimizer(other_model.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2,
                                           min_8bit_size=0)
            set_optimizer_state_dict(other_model, other, full if rank == 0 else {},
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            assert same(before, snapshot(other)), "full_state_dict + broadcast_from_rank0 loaded other state"

        fresh = make()
        fresh_opt = dist8.ShardedOptimizer(fresh.named_parameters(), dist8.AdamW8bit, stage=stage, lr=1e-2,
                                           min_8bit_size=0)
        fresh.load_state_dict(model.state_dict())
        loaded = {"optim": get_optimizer_state_dict(fresh, fresh_opt, options=options)}
        dcp.load(loaded, checkpoint_id=path)
        set_optimizer_state_dict(fresh, fresh_opt, loaded["optim"], options=options)
        assert same(before, snapshot(fresh_opt)), f"stage {stage} flatten {flatten}: DCP loaded other state"
        run(model, opt, 2, 4, rank)
        run(fresh, fresh_opt, 2, 4, rank)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters())), (stage, flatten)
        out[stage, flatten] = {n: p.detach().clone() for n, p in model.named_parameters()}
    return out


def test_sharded_optimizer_saves_and_loads_through_dcp_and_loads_on_one_rank(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from torch.distributed.checkpoint.state_dict import StateDictOptions

    out = run_ranks(_worker, 2, str(tmp_path), tmp_path=tmp_path)[0]
    assert all(torch.equal(p, out[2, True][n]) for n, p in out[2, False].items())
    full = out["full2"]
    # The 2-rank DCP checkpoints (saved after 2 steps) into a plain optimizer in this single process.
    for flatten in (False, True):
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        model = make()
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
        loaded = {"optim": get_optimizer_state_dict(model, opt, options=options)}
        dcp.load(loaded, checkpoint_id=str(tmp_path / ("stage2flat" if flatten else "stage2")))
        set_optimizer_state_dict(model, opt, loaded["optim"], options=options)
        mine = opt.state_dict()["state"]
        assert mine.keys() == full.keys() == {0, 1, 2, 3}
        for i, st in full.items():
            assert st["step"] == mine[i]["step"] == 2
            assert all(torch.equal(v, mine[i][k]) for k, v in st.items() if torch.is_tensor(v)), (flatten, i)
