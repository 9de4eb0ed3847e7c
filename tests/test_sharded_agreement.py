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
