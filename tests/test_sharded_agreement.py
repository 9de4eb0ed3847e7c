"""ShardedOptimizer compares its settings across ranks when built (one gather, with the layout check): a rank
built with its own lr, betas, quant_map, param-group split, ... is refused on every rank in one line naming
the setting, its two values and the ranks, instead of training its blocks with its own settings (one model
as a patchwork of settings, replicas equal, nothing said; a checkpoint labelled with rank 0's quant_map).
Settings that are equal but written differently still build."""
import faulthandler
import os
import subprocess
import sys

import torch

import dist8
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

HANG_S = 90  # a rank left waiting in a collective fails the test in this many seconds, with its stack
BASE = dict(lr=1e-2, min_8bit_size=1024)  # 0.weight and 1.weight (4096 values) get 8-bit state
BY_LAYER = "by layer"

# (case, stage, rank 0's arguments, rank 1's, what the refusal names; None: it builds). Besides the
# optimizer's arguments: "cls", "stage", "dtype", "split" (the param groups) and "mark" (an override of 1.weight).
CASES = [
    ("lr", 2, {}, {"lr": 1e-3}, "param group 0 lr is 0.01 on rank 0 and 0.001 on rank 1"),
    ("betas", 1, {}, {"betas": (0.5, 0.9)}, "param group 0 betas is (0.9, 0.999) on rank 0 and (0.5, 0.9) on rank 1"),
    ("weight_decay", 2, {}, {"weight_decay": 0.5}, "param group 0 weight_decay is 0.01 on rank 0 and 0.5 on rank 1"),
    ("optim_bits", 1, {}, {"optim_bits": 32}, "param group 0 optim_bits is 8 on rank 0 and 32 on rank 1"),
    ("min_8bit_size", 2, {}, {"min_8bit_size": 10**9},
     "param group 0 min_8bit_size is 1024 on rank 0 and 1000000000 on rank 1"),
    ("quant_map", 2, {}, {"quant_map": "linear"}, "quant_map is 'dynamic' on rank 0 and 'linear' on rank 1"),
    ("master_weight_bits", 2, {"dtype": torch.bfloat16}, {"dtype": torch.bfloat16, "master_weight_bits": 24},
     "param group 0 master_weight_bits is None on rank 0 and 24 on rank 1"),
    ("group count", 1, {"split": BY_LAYER}, {}, "the number of param groups is 2 on rank 0 and 1 on rank 1"),
    ("group split", 2, {"split": BY_LAYER}, {"split": "weight alone"},
     "the param group of parameter 0.bias is 0 on rank 0 and 1 on rank 1"),
    ("second group's lr", 2, {"split": BY_LAYER}, {"split": BY_LAYER, "group 1 lr": 3e-3},
     "param group 1 lr is 0.002 on rank 0 and 0.003 on rank 1"),
    ("optimizer class", 1, {}, {"cls": dist8.Lion8bit},
     "optimizer_class is 'dist8.optim.adam.AdamW8bit' on rank 0 and 'dist8.optim.lion.Lion8bit' on rank 1"),
    ("stage", None, {"stage": 1}, {"stage": 2}, "stage is 1 on rank 0 and 2 on rank 1"),
    ("override mark", 2, {}, {"mark": {"optim_bits": 32}},
     "parameter 1.weight's override mark is {} on rank 0 and {'optim_bits': 32} on rank 1"),
    # equal values written differently: a tensor lr, a list of betas, an int weight decay, defaults written out
    ("equal, written differently", 2, {"lr": torch.tensor(0.25), "betas": [0.9, 0.999], "weight_decay": 0},
     {"lr": 0.25, "weight_decay": 0.0, "eps": 1e-8, "quant_map": "dynamic", "optim_bits": 8}, None),
    ("equal groups", 1, {"split": BY_LAYER}, {"split": BY_LAYER}, None),
    # a client's own keys (torch takes any): a set, whose order follows each process's string-hash seed, and an
    # object, whose repr holds its address (refused as differing before)
    ("client keys", 2, {"client keys": True}, {"client keys": True}, None),
]


class _Tag:
    """A client's object in a param group."""


def _params(model, split, group_1_lr, client_keys=False):
    named = list(model.named_parameters())
    if client_keys:
        return [{"params": named, "no_decay": {"bias", "norm", "ln_f", "emb", "LayerNorm.weight"}, "tag": _Tag()}]
    if split == BY_LAYER:
        return [{"params": named[:2]}, {"params": named[2:], "lr": group_1_lr}]
    if split == "weight alone":
        return [{"params": named[:1]}, {"params": named[1:], "lr": group_1_lr}]
    return named


def _build_and_step(rank, stage, spec):
    """A model of two Linear(64, 64) and ShardedOptimizer as ``spec`` says; one step; the parameters after it."""
    spec = dict(spec)
    cls, stage = spec.pop("cls", dist8.AdamW8bit), spec.pop("stage", stage)
    dtype, split, mark = spec.pop("dtype", torch.float32), spec.pop("split", None), spec.pop("mark", None)
    group_1_lr, client_keys = spec.pop("group 1 lr", 2e-3), spec.pop("client keys", False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)).to(dtype)
    manager = dist8.GlobalOptimManager.get_instance()
    if mark is not None:
        manager.override_config(model[1].weight, key_value_dict=mark)
    try:
        opt = ShardedOptimizer(_params(model, split, group_1_lr, client_keys), cls, stage=stage, **{**BASE, **spec})
    finally:
        manager.initialize()
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
    model(x).float().square().mean().backward()  # the same batch on every rank: stage 1 needs no DDP
    opt.step()
    return [p.detach().float().clone() for p in model.parameters()]


def _every_case(rank, world_size):
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    out = {}
    for case, stage, rank0, rank1, _ in CASES:
        try:
            out[case] = _build_and_step(rank, stage, rank0 if rank == 0 else rank1)
        except ValueError as exc:
            out[case] = str(exc)
    faulthandler.cancel_dump_traceback_later()
    return out


def test_settings_that_differ_between_ranks_are_refused_on_every_rank(tmp_path):
    rank0, rank1 = run_ranks(_every_case, 2, tmp_path=tmp_path)
    for case, _, _, _, named in CASES:
        if named is None:
            assert not isinstance(rank0[case], str), f"{case}: {rank0[case]}"
            assert not isinstance(rank1[case], str), f"{case}: {rank1[case]}"
            assert all(torch.equal(a, b) for a, b in zip(rank0[case], rank1[case])), case
            continue
        expected = (f"ShardedOptimizer settings differ between ranks: {named}; every rank must build the "
                    "optimizer with the same settings")
        assert rank0[case] == expected, case
        assert rank1[case] == expected, case


def test_a_set_in_a_param_group_compares_the_same_whatever_the_hash_seed():
    """torchrun's ranks are separate interpreters with their own string-hash seeds, so a set's order (and its
    repr) differs between them; run_ranks' ranks share one seed, so this is checked in two interpreters."""
    code = ("import torch; from dist8.shard.construction import optimizer_settings; import dist8; "
            "p = torch.nn.Parameter(torch.zeros(4)); "
            "print(repr(optimizer_settings(dist8.AdamW8bit, [{'params': [p], 'no_decay': "
            "{'bias', 'norm', 'ln_f', 'emb', 'LayerNorm.weight'}}], {}, [p])))")
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=seed)).stdout for seed in ("1", "2")]
    assert outs[0] == outs[1] and "'bias'" in outs[0]


# Changed on one rank after the optimizer was built: (case, edit on rank 1 before the second step, what every rank's
# refusal names). Each was unseen until 2026-12-04: the lr and betas edits and the scheduler trained each rank's
# blocks with that rank's values (equal replicas, a patchwork model); the others left the ranks waiting forever.
LATE_EDITS = [
    ("lr", lambda opt, sched: opt.param_groups[0].__setitem__("lr", 0.1),
     "param group 0's lr is 0.01 on rank 0 but 0.1"),
    ("betas", lambda opt, sched: opt.param_groups[0].__setitem__("betas", (0.5, 0.9)), "param group 0's betas"),
    ("negative lr", lambda opt, sched: opt.param_groups[0].__setitem__("lr", -1.0), "param group 0's lr"),
    ("percentile_clipping", lambda opt, sched: opt.param_groups[0].__setitem__("percentile_clipping", 5),
     "param group 0's percentile_clipping"),
    ("optim_bits", lambda opt, sched: opt.param_groups[0].__setitem__("optim_bits", 32), "param group 0's optim_bits"),
    ("scheduler", lambda opt, sched: sched.step(), "param group 0's lr is 0.01 on rank 0 but 0.005"),
    ("override", lambda opt, sched: dist8.GlobalOptimManager.get_instance().override_config(
        opt.params[2], key_value_dict={"lr": 0.0}), "parameter 1.weight's override"),
    ("removed", lambda opt, sched: opt.param_groups[0].__setitem__("params", opt.param_groups[0]["params"][1:]),
     "parameter 0.weight was removed from param group 0"),
]


def _late_edits(rank, world_size):
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    out = {}
    for stage in (1, 2):
        for case, edit, _ in LATE_EDITS:
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
            opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, **BASE)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
            if rank == 1:
                edit(opt, sched)
            before = [p.detach().clone() for p in model.parameters()]
            model(x).square().mean().backward()
            try:
                opt.step()
                out[(stage, case)] = "stepped"
            except (ValueError, RuntimeError) as exc:
                out[(stage, case)] = str(exc)
            out[(stage, case, "unchanged")] = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            dist8.GlobalOptimManager.get_instance().initialize()
    faulthandler.cancel_dump_traceback_later()
    return out


def test_a_setting_changed_on_one_rank_after_building_is_refused_on_every_rank(tmp_path):
    """Compared when the optimizer was built only: a param-group edit, scheduler step or override made on one
    rank afterwards trained a patchwork of settings, silently, or left the other ranks waiting in the step's
    collectives. One all-reduce per step now refuses it on every rank, naming it, nothing updated."""
    rank0, rank1 = run_ranks(_late_edits, 2, tmp_path=tmp_path)
    for stage in (1, 2):
        for case, _, named in LATE_EDITS:
            for rank, out in enumerate((rank0, rank1)):
                said = out[(stage, case)]
                assert named in said and "\n" not in said, (stage, case, rank, said)
                if case == "removed" and rank == 0:  # the rank that did not refuse names the one that did
                    assert said.startswith("ShardedOptimizer.step() failed on rank 1: "), (stage, said)
                assert out[(stage, case, "unchanged")], (stage, case, rank)
