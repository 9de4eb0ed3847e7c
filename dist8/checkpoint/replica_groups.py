"""Which ranks write a checkpoint when a ShardedOptimizer's ``process_group`` is smaller than the world.

``ShardedOptimizer(process_group=g)`` shards the state over ``g`` only: under DDP over every rank with one
group per node (ZeRO-1 within a node), the groups are replicas of one model; under tensor or pipeline
parallelism they hold different parameters. ``dist8.checkpoint.save`` writes each group's pieces with
that group's collectives, so two groups saving into one directory wrote the same files at once: a corrupt
checkpoint (a file failing its sha256 at load) or a save that failed on some ranks and succeeded on
others (until 2026-12-04). Here the ranks decide, in one collective over the world, which group writes
each directory: groups saving into one directory must hold the same parameters -- the same names and
shapes, and bitwise the same values (an exact fingerprint per parameter, as stage 1 compares its
gradients) -- and the group of the lowest rank writes it; other parameters in one directory are refused on
every rank, naming the groups and the directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from dist8.checkpoint.adapters import OptimizerAdapter
from dist8.checkpoint.format import CheckpointError
from dist8.shard.agreement import from_every_rank
from dist8.shard.collectives import collective_device, wait_for_every_rank
from dist8.shard.replicated_grads import gradient_fingerprints

__all__ = ["is_subgroup", "writes_here"]


def is_subgroup(ad: OptimizerAdapter) -> bool:
    """Whether ``ad``'s optimizer shards over a process group smaller than the world."""
    return (ad.group is not None and dist.is_available() and dist.is_initialized()
            and dist.get_world_size(ad.group) < dist.get_world_size())


def writes_here(ad: OptimizerAdapter, final: Path) -> bool:
    """Whether this rank's group writes ``final`` (collective over the world; see the module docstring).

    Raises :class:`CheckpointError` on every rank when groups holding different parameters save into
    one directory."""
    wait_for_every_rank(None, collective_device(None), "dist8.checkpoint.save()",
                        "With ShardedOptimizer(process_group=...) smaller than the world, every rank of the world "
                        "calls it: the groups decide together which of them writes each directory.")
    params = [ad.params[p.index] for p in ad.layout.params]
    mine = {
        "path": os.path.abspath(final),
        "group": dist.get_process_group_ranks(ad.group),
        "params": [(p.name, tuple(p.shape)) for p in ad.layout.params],
        "values": gradient_fingerprints(params, torch.device("cpu")).tolist(),
    }
    everyone = from_every_rank(mine, None)
    for rank, theirs in enumerate(everyone):  # every rank checks every directory: one verdict everywhere
        same_dir = [r for r, other in enumerate(everyone) if other["path"] == theirs["path"]]
        first = everyone[same_dir[0]]
        if theirs["params"] != first["params"] or theirs["values"] != first["values"]:
            what = "other parameters" if theirs["params"] != first["params"] else "other parameter values"
            raise CheckpointError(
                f"dist8.checkpoint.save: the ShardedOptimizer groups of ranks {first['group']} and {theirs['group']} "
                f"(process_group smaller than the world) save {what} into one directory {theirs['path']}: groups "
                "that are not replicas of one model (tensor or pipeline parallelism) need a directory each; "
                "replicas whose values differ were not averaged across groups (stage=2 averages gradients over "
                "process_group only: use stage=1 under DDP over every rank)")
    mine_first = min(r for r, other in enumerate(everyone) if other["path"] == mine["path"])
    return mine_first in mine["group"]
