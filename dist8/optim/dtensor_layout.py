"""Where a rank's local shard of a DTensor (FSDP2 ``fully_shard``) parameter lies in the global
flattened parameter, and the small DTensor helpers every layer uses (cheap when DTensor was
never imported). The optimizer maths for those shards is in :mod:`dist8.optim.dtensor_update`,
state and state dicts in :mod:`dist8.optim.dtensor`.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from dist8.quant import num_blocks

__all__ = ["is_dtensor", "local", "full_tensor", "check_param", "shard_dims", "one_plain_shard", "world_group", "box_of", "chunk",
           "counts_skips",
           "Layout", "flat_range", "whole_block_runs", "layout_of", "comm_device", "has_dtensor"]

_FSDP1_MSG = (
    "parameter {name} is an FSDP1 flat parameter (FullyShardedDataParallel); dist8 optimizers need the "
    "original parameters: wrap the model with torch.distributed.fsdp.fully_shard (FSDP2) or use "
    "dist8.ShardedOptimizer (ZeRO-1/2) instead"
)


def _dtensor_cls():
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (cheap when DTensor was never imported)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (shares storage); other tensors unchanged."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective on its mesh); other tensors unchanged.

    int16 (``master_weight_bits=32``'s correction) travels as pairs of uint8 in a new last dimension:
    gloo has no int16 all-gather ("Invalid scalar type"), and the extra dimension keeps every shard
    placement's chunks where they were, so the bytes come back exactly."""
    if not is_dtensor(t):
        return t
    if t.dtype != torch.int16:
        return t.full_tensor()
    from torch.distributed.tensor import DTensor

    pairs = t.to_local().contiguous().unsqueeze(-1).view(torch.uint8)
    shape = (*t.shape, 2)
    wide = DTensor.from_local(pairs, t.device_mesh, t.placements, run_check=False, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())
    return wide.full_tensor().view(torch.int16).squeeze(-1)


def check_param(name: str, p: torch.Tensor) -> None:
    """Refuse FSDP1 flat parameters with a message that says what to use instead."""
    if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
        raise TypeError(_FSDP1_MSG.format(name=name))
    if is_dtensor(p):
        shard_dims(p, name)  # validates the placements


# ---- layout ------------------------------------------------------------------------------------
def shard_dims(p, name: str) -> tuple[tuple[int, int], ...]:
    """``(mesh_dim, tensor_dim)`` of each Shard placement of DTensor ``p`` in mesh order (FSDP's
    ``_StridedShard``, FSDP + TP on one tensor dimension, included); ``()`` if only Replicate."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard  # FSDP's, on a dim TP shards too

    found = []
    for mesh_dim, pl in enumerate(p.placements):
        if isinstance(pl, (Shard, _StridedShard)):
            found.append((mesh_dim, pl.dim))
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(
                f"parameter {name} has placement {pl} ({p.placements}); dist8 supports Shard(d) (FSDP's strided "
                "Shard included) and Replicate"
            )
    return tuple(found)


def one_plain_shard(p, dims: tuple[tuple[int, int], ...]) -> bool:
    """True when ``p`` is sharded by exactly one plain ``Shard`` (FSDP2, HSDP, 1-D tensor parallelism):
    the shards of one process group, laid out by ``torch.chunk``."""
    from torch.distributed.tensor import Shard

    return len(dims) == 1 and type(p.placements[dims[0][0]]) is Shard


def counts_skips(p, whole: bool) -> bool:
    """Whether this rank counts DTensor ``p``'s non-finite skips, so that the counts summed over all
    ranks are the unsharded run's: skipped blocks (``whole`` False) are counted on the first replica
    only (coordinate 0 on every ``Replicate`` mesh dimension: HSDP's replicate dimension, tensor
    parallelism's replicated parameters; the ranks of the shard dimensions count their own blocks), a
    parameter skipped whole (``on_nonfinite="skip_param"``/``"raise"``, ``whole`` True) on the rank at
    coordinate 0 of every mesh dimension."""
    coords = p.device_mesh.get_coordinate()
    return coords is not None and all(c == 0 for c, pl in zip(coords, p.placements) if whole or pl.is_replicate())


def world_group(p, name: str):
    """The default process group, for a parameter sharded on several mesh dimensions (FSDP + TP):
    its reductions run over every rank, so its mesh must hold every rank."""
    import torch.distributed as dist

    if p.device_mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            f"parameter {name} is sharded on several mesh dimensions ({p.placements}) of a mesh of "
            f"{p.device_mesh.size()} ranks out of {dist.get_world_size()}; dist8 supports such parameters on a mesh "
            "of all ranks"
        )
    return dist.group.WORLD


def box_of(p, name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global offset, local shape) of this rank's shard of DTensor ``p``: the box of the global tensor
    that torch (and its DCP) reads the shard as, checked against the local tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    box_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    local_shape = tuple(p.to_local().shape)
    if tuple(box_shape) != local_shape:
        raise NotImplementedError(
            f"parameter {name}: local shard {local_shape} is not the box {tuple(box_shape)} at {tuple(offset)} that "
            f"torch computes for {p.placements}"
        )
    return tuple(offset), local_shape


def chunk(size: int, parts: int, index: int) -> tuple[int, int]:
    """``[start, stop)`` of chunk ``index`` of ``size`` split like ``torch.chunk`` (DTensor's Shard)."""
    full = (size + parts - 1) // parts
    start = min(full * index, size)
    return start, min(start + full, size)


@dataclass(frozen=True)
class Layout:
    """Where a rank's local shard of a DTensor parameter lies in the global flat parameter."""

    numel: int  # global element count
    block: int
    nblocks: int  # global blocks
    local_shape: tuple[int, ...]
    contiguous: bool  # local elements are the global flat range [g0, g1) (Shard(0) or no Shard)
    g0: int
    g1: int
    b0: int  # absmax held locally: global blocks [b0, b1)
    b1: int
    shared: tuple[int, ...]  # contiguous: global blocks cut by some rank's shard edge
    # not contiguous (Shard(d), d > 0; FSDP + TP): the local shard is the box of the global tensor
    # that starts at ``offsets`` (one per dimension) with the local shape
    global_shape: tuple[int, ...] = ()
    offsets: tuple[int, ...] = ()
    group: Any = None  # process group over which the shards differ (None: nothing to reduce)
    # a box whose runs are whole blocks (TP columns of a multiple of the block): the global block of each
    # local block, in local order (absmax held in that order; the fused kernel, no edges); else None
    block_index: torch.Tensor | None = field(default=None, compare=False)

    @property
    def holds_every_block(self) -> bool:
        """Whether this rank keeps the absmax of every block (the specification path's box shards)."""
        return not self.contiguous and self.block_index is None

    def local_absmax(self, full: torch.Tensor) -> torch.Tensor:
        """The absmax entries this rank holds, from the parameter's full-length absmax."""
        full = full.reshape(-1)
        if self.block_index is not None:
            return full[self.block_index.to(full.device)]
        return full[self.b0:self.b1]

    def full_absmax(self, held: torch.Tensor) -> torch.Tensor:
        """A full-length absmax with this rank's entries in place and zeros elsewhere (to max-reduce)."""
        full = torch.zeros(self.nblocks, dtype=torch.float32, device=held.device)
        if self.block_index is not None:
            full[self.block_index.to(held.device)] = held
        else:
            full[self.b0:self.b1] = held
        return full

    def global_index(self) -> torch.Tensor:
        """Global flat index (int64) of every local element, in local flat order."""
        if self.contiguous:
            return torch.arange(self.g0, self.g1)
        index = torch.zeros((), dtype=torch.int64)
        stride = 1
        for d in reversed(range(len(self.global_shape))):
            view = [1] * len(self.global_shape)
            view[d] = -1
            index = index + ((torch.arange(self.local_shape[d]) + self.offsets[d]) * stride).view(view)
            stride *= self.global_shape[d]
        return index.reshape(-1)

    def slice_global(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a tensor with the global shape."""
        if self.contiguous:
            return full.reshape(-1)[self.g0:self.g1].view(self.local_shape)
        for d, (offset, size) in enumerate(zip(self.offsets, self.local_shape)):
            full = full.narrow(d, offset, size)
        return full


def flat_range(shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, int] | None:
    """``[start, stop)`` in the flattened tensor of ``shape`` when the box at ``offset`` of ``size`` is one
    run of it (its leading dimensions of size 1, then one partial dimension, then whole ones), else None."""
    strides = [1] * len(shape)
    for d in reversed(range(len(shape) - 1)):
        strides[d] = strides[d + 1] * shape[d + 1]
    start = sum(o * st for o, st in zip(offset, strides))
    count = math.prod(size)
    if count == 0:
        return start, start
    partial = [d for d in range(len(shape)) if size[d] != shape[d]]  # every later dimension is whole
    if partial and any(size[d] != 1 for d in range(partial[-1])):
        return None
    return start, start + count


def whole_block_runs(shape: tuple[int, ...], offset: tuple[int, ...], size: tuple[int, ...],
                     block: int) -> torch.Tensor | None:
    """The global block of every local block when each run of the box (the part of it along its last
    partial dimension and the whole ones after it) is whole blocks, in local order; else None."""
    partial = [d for d in range(len(shape)) if size[d] != shape[d]]
    if not partial:
        return None
    k = partial[-1]
    inner = math.prod(shape[k + 1:])
    run, start, row = size[k] * inner, offset[k] * inner, shape[k] * inner
    if run % block or start % block or row % block:
        return None
    starts = torch.full((), start, dtype=torch.int64)
    stride = row
    for d in reversed(range(k)):  # every combination of the leading dimensions' indices, in local order
        view = [1] * k
        view[d] = -1
        starts = starts + ((torch.arange(size[d]) + offset[d]) * stride).view(view)
        stride *= shape[d]
    return ((starts.reshape(-1, 1) + torch.arange(0, run, block).view(1, -1)) // block).reshape(-1)


def _run_layout(n: int, block: int, nb: int, local_shape: tuple[int, ...], g0: int, g1: int, edges,
                group) -> Layout:
    """A shard that is the flat run ``[g0, g1)``; ``edges``: every rank's run boundaries, which give the
    blocks two ranks share."""
    cuts = {x // block for x in edges if 0 < x < n and x % block}
    b0 = g0 // block
    b1 = num_blocks(g1, block) if g1 > g0 else b0
    return Layout(n, block, nb, local_shape, True, g0, g1, b0, b1, tuple(sorted(cuts)), group=group)


def _box_layout(n: int, block: int, nb: int, local_shape: tuple[int, ...], shape: tuple[int, ...],
                offset: tuple[int, ...], group, every_box: list | None = None) -> Layout:
    """A shard that is not one flat run: whole-block runs on the fused kernel, anything else on the
    specification with every block's absmax. ``every_box``: every rank's (offset, local shape); the
    fused kernel only when every non-empty box is whole-block runs, for the specification path's edge
    reduction is a collective: with uneven shards one rank took the kernel, the others the
    specification, and they waited in its all-reduce forever."""
    blocks = whole_block_runs(shape, offset, local_shape, block)
    if every_box is not None:
        others_fit = all(whole_block_runs(shape, tuple(o), tuple(sz), block) is not None
                         for o, sz in every_box if math.prod(sz))
        if not others_fit:
            blocks = None
        elif not math.prod(local_shape):  # an empty box beside whole-block ones: the kernel's path, no blocks
            blocks = torch.zeros(0, dtype=torch.int64)
    if blocks is not None:
        return Layout(n, block, nb, local_shape, False, 0, 0, 0, blocks.numel(), (), shape, offset, group, blocks)
    return Layout(n, block, nb, local_shape, False, 0, 0, 0, nb, (), shape, offset, group)


def layout_of(p, block: int, name: str = "?", boxes: list | None = None) -> Layout:
    """Layout of DTensor ``p`` for quantization blocks of ``block`` elements; ``boxes``: every rank's
    (offset, local shape) of ``p`` (parameters sharded on several mesh dimensions: see
    ``dtensor.attach``), which lets a shard that is one run of the flattened tensor take the fused
    kernel with edge blocks."""
    shape = tuple(p.shape)
    n = p.numel()
    nb = num_blocks(n, block)
    local_shape = tuple(p.to_local().shape)
    dims = shard_dims(p, name)
    if not dims or n == 0:
        return Layout(n, block, nb, local_shape, True, 0, n, 0, nb, ())
    if not one_plain_shard(p, dims):  # FSDP + TP
        offset, _ = box_of(p, name)
        group = world_group(p, name)
        ranges = [flat_range(shape, tuple(o), tuple(sz)) for o, sz in boxes or ()]
        mine = flat_range(shape, offset, local_shape)
        if boxes and mine is not None and None not in ranges:  # FSDP + TP on rows: every shard a flat run
            edges = (x for a, b in ranges if b > a for x in (a, b))
            return _run_layout(n, block, nb, local_shape, *mine, edges, group)
        return _box_layout(n, block, nb, local_shape, shape, offset, group, boxes)
    mesh_dim, dim = dims[0]
    mesh = p.device_mesh
    parts = mesh.size(mesh_dim)
    coord = mesh.get_coordinate()[mesh_dim]
    group = mesh.get_group(mesh_dim)
    start, stop = chunk(shape[dim], parts, coord)
    offset, _ = box_of(p, name)
    if local_shape[dim] != stop - start or (stop > start and offset[dim] != start):
        raise NotImplementedError(
            f"parameter {name}: local shard {local_shape} at offset {offset} is not the torch.chunk split "
            f"rows [{start}, {stop}) that dist8 assumes"
        )
    row = n // shape[dim] if shape[dim] else 0
    if dim == 0 or all(s == 1 for s in shape[:dim]):
        edges = (chunk(shape[dim], parts, r)[1] * row for r in range(parts - 1))
        return _run_layout(n, block, nb, local_shape, start * row, stop * row, edges, group)
    offsets = tuple(start if d == dim else 0 for d in range(len(shape)))

    def box(r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        a, b = chunk(shape[dim], parts, r)
        return (tuple(a if d == dim else 0 for d in range(len(shape))),
                tuple(b - a if d == dim else shape[d] for d in range(len(shape))))

    return _box_layout(n, block, nb, local_shape, shape, offsets, group, [box(r) for r in range(parts)])


def comm_device(group) -> torch.device:
    """The device collectives over ``group`` use (CUDA for NCCL, else CPU)."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def has_dtensor(st: dict) -> bool:
    """True when any value of ``st`` is a DTensor."""
    return any(is_dtensor(v) for v in st.values())
