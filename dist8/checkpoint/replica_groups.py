"""Which ranks write a checkpoint directory when the optimizer's state is held by fewer ranks than the world.

The ranks holding one copy of an optimizer's state -- its *state ranks* -- are a ``ShardedOptimizer``'s
``process_group``, the mesh of an FSDP2 model's parameters, or, for an unsharded optimizer, the rank
alone. When they are the whole world, the world saves as one. Otherwise several copies exist: replicas
(DDP over every rank of an unsharded optimizer, or of ``ShardedOptimizer(process_group=g)``: ZeRO-1
within a node) or other parameters altogether (pipeline stages, tensor parallelism), each saved by its
own ranks. Until 2026-12-04 ``dist8.checkpoint.save`` knew nothing of this: two ``ShardedOptimizer``
groups saving into one directory wrote the same files at once (a checkpoint failing its sha256 at
load), and an unsharded or FSDP2 optimizer was written by world rank 0 alone -- a pipeline stage
holding other parameters saved nothing into its own directory, or its parameters were replaced by
rank 0's in a shared one, while ``save`` returned on every rank.

Here the ranks decide, in one collective over the world, who writes each directory: the copies saved
into one directory must hold the same parameters -- the same names and shapes, and bitwise the same
values (an exact fingerprint per parameter, as stage 1 compares its gradients; for FSDP2, whose ranks
hold different shards, one mesh per directory) -- and the state ranks of the lowest rank saving there
write it. Anything else is refused on every rank before anything is written, naming the ranks and the
directory.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from dist8.checkpoint.adapters import FSDP2Adapter, OptimizerAdapter
from dist8.checkpoint.format import CheckpointError
from dist8.shard import ShardedOptimizer
from dist8.shard.agreement import from_every_rank
from dist8.shard.collectives import collective_device, wait_for_every_rank
from dist8.shard.replicated_grads import gradient_fingerprints

__all__ = ["state_ranks", "saves_as_the_world", "writes_here", "writer_adapter"]


def state_ranks(ad: OptimizerAdapter) -> list[int]:
    """The world ranks that hold one copy of ``ad``'s optimizer state together (see the module docstring)."""
    if isinstance(ad.optimizer, ShardedOptimizer):
        return dist.get_process_group_ranks(ad.group) if ad.group is not None else list(range(dist.get_world_size()))
    if isinstance(ad, FSDP2Adapter):
        return sorted({r for p in ad.params for r in p.device_mesh.mesh.flatten().tolist()})
    return [dist.get_rank()]


def saves_as_the_world(ad: OptimizerAdapter) -> bool:
    """Whether every rank of the world saves ``ad``'s optimizer as one (no distribution, or its state ranks
    are the world)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return True
    return len(state_ranks(ad)) == dist.get_world_size()


def _mesh_dims(ad: OptimizerAdapter) -> int:
    meshes = {id(p.device_mesh): p.device_mesh for p in ad.params}
    return max(m.ndim for m in meshes.values()) if len(meshes) == 1 else -1


def writes_here(ad: OptimizerAdapter, final: Path) -> bool:
    """Whether this rank's state ranks write ``final`` (collective over the world, the same verdict on
    every rank). Raises :class:`CheckpointError` on every rank for copies that cannot share a directory."""
    wait_for_every_rank(None, collective_device(None), "dist8.checkpoint.save()",
                        "When the optimizer's state is held by fewer ranks than the world (an unsharded optimizer, "
                        "ShardedOptimizer(process_group=...), FSDP2 on part of the ranks), every rank of the world "
                        "calls it: the ranks decide together who writes each directory.")
    params = [ad.params[p.index] for p in ad.layout.params]
    fsdp = isinstance(ad, FSDP2Adapter)
    mine: dict[str, Any] = {
        "path": os.path.abspath(final),
        "ranks": state_ranks(ad),
        "params": [(p.name, tuple(p.shape)) for p in ad.layout.params],
        "values": None if fsdp else gradient_fingerprints(params, torch.device("cpu")).tolist(),
        "mesh_dims": _mesh_dims(ad) if fsdp else 0,
    }
    everyone = from_every_rank(mine, None)
    for theirs in everyone:  # every rank checks every directory: one verdict everywhere
        first = next(other for other in everyone if other["path"] == theirs["path"])
        same = theirs["params"] == first["params"]
        if same and (first["values"] is None or theirs["values"] is None):
            same = theirs["ranks"] == first["ranks"]  # FSDP2: the ranks hold shards; one mesh per directory
        elif same:
            same = theirs["values"] == first["values"]
        if not same:
            what = "other parameters" if theirs["params"] != first["params"] else (
                "the shards of another mesh" if first["values"] is None else "other parameter values")
            raise CheckpointError(
                f"dist8.checkpoint.save: the optimizer state of ranks {first['ranks']} and of ranks {theirs['ranks']} "
                f"(held by fewer ranks than the world) save {what} into one directory {theirs['path']}: copies "
                "that are not replicas of one model (pipeline stages, tensor parallelism) need a directory each; "
                "replicas whose values differ were not averaged across them (ShardedOptimizer stage=2 averages "
                "gradients over its process_group only: use stage=1 under DDP over every rank)")
        if theirs["mesh_dims"] > 1 or theirs["mesh_dims"] < 0:
            raise CheckpointError(
                f"dist8.checkpoint.save: the FSDP2 parameters of ranks {theirs['ranks']} lie on "
                f"{'several meshes' if theirs['mesh_dims'] < 0 else 'a multi-dimensional mesh'} of part of the world's "
                f"{len(everyone)} ranks, which dist8.checkpoint cannot gather; save them with "
                "dist8.integrations.fsdp.save_dcp (torch DCP), or lay the mesh over every rank")
    lowest = min(r for r, other in enumerate(everyone) if other["path"] == mine["path"])
    return lowest in mine["ranks"]


def writer_adapter(ad: OptimizerAdapter) -> OptimizerAdapter:
    """``ad`` as its state ranks save it: collectives over their group, ranks numbered within it (a
    1-D FSDP2 mesh: its group; an unsharded optimizer: the rank alone, no collective)."""
    if isinstance(ad.optimizer, ShardedOptimizer):
        return ad
    writer = copy.copy(ad)  # an FSDP2 adapter keeps its model
    if isinstance(ad, FSDP2Adapter):
        mesh = ad.params[0].device_mesh
        writer.group = mesh.get_group()
        writer.rank, writer.world_size = dist.get_rank(writer.group), mesh.size()
        writer.writes = writer.rank == 0
    else:
        writer.rank, writer.world_size, writer.writes, writer.alone = 0, 1, True, True
    return writer
