"""Flat parameter buffers of ShardedOptimizer: one per parameter dtype, block-aligned, in layout order.

The block layout (:mod:`dist8.shard.layout`) and its partition over ranks are dtype-blind:
checkpoints and the rank ranges depend on names, shapes and the block size only. A model
whose parameters have several dtypes (``dist8.cast_model`` keeps norm layers fp32 next to
bf16 weights) keeps each dtype's parameters in a buffer of their own: the layout's blocks
of that dtype's parameters, in layout order, without the others. Because a rank owns one
contiguous run of the layout's blocks, it owns one contiguous run of every buffer, so
gathers, reductions and the fp32 master copy stay single ranges per buffer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from dist8.shard.layout import BlockLayout

__all__ = ["FlatBuffer", "flat_buffers"]


class FlatBuffer:
    """The parameters of one dtype in one flat, block-padded tensor.

    Args:
        layout: the optimizer's block layout (all parameters).
        members: indices (into ``layout.params``) of this buffer's parameters, ascending.
        dtype: their dtype; device: where the buffer lives.
        rank_block_ranges: ``layout.block_ranges(world_size)`` (layout blocks per rank).

    Attributes:
        flat: the buffer (``numel`` = this dtype's blocks x block size).
        offset: parameter index -> element offset of the parameter in ``flat``.
        rank_ranges: per rank, the element range ``[lo, hi)`` of ``flat`` it owns.
    """

    def __init__(self, layout: BlockLayout, members: Sequence[int], dtype: torch.dtype, device: torch.device,
                 rank_block_ranges: Sequence[tuple[int, int]]) -> None:
        B = layout.block_size
        self.dtype, self.members = dtype, list(members)
        self.offset: dict[int, int] = {}
        starts = []  # (first layout block, first local block, blocks) per member
        local = 0
        for i in self.members:
            slot = layout.params[i]
            self.offset[i] = local * B
            starts.append((slot.first_block, local, slot.n_blocks))
            local += slot.n_blocks
        self.flat = torch.zeros(local * B, dtype=dtype, device=device)

        def local_block(g: int) -> int:  # this buffer's blocks that lie before layout block g
            n = 0
            for first, loc, nb in starts:
                if first >= g:
                    break
                n = loc + min(nb, g - first)
            return n

        self.rank_ranges = [(local_block(a) * B, local_block(b) * B) for a, b in rank_block_ranges]

    def view(self, index: int, start: int, numel: int, of: torch.Tensor | None = None) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of parameter ``index`` in ``flat``, or in ``of``, a tensor laid
        out like it (the stage-2 gradient buffer)."""
        off = self.offset[index] + start
        return (self.flat if of is None else of)[off : off + numel]

    def owned(self, rank: int) -> torch.Tensor:
        lo, hi = self.rank_ranges[rank]
        return self.flat[lo:hi]

    def __repr__(self) -> str:
        return f"FlatBuffer({self.dtype}, {len(self.members)} params, {self.flat.numel()} elements)"


def flat_buffers(layout: BlockLayout, dtypes: Sequence[torch.dtype], device: torch.device,
                 world_size: int) -> list[FlatBuffer]:
    """One :class:`FlatBuffer` per distinct dtype in ``dtypes`` (one per layout parameter), in order of first use."""
    ranges = layout.block_ranges(world_size)
    return [FlatBuffer(layout, [i for i, d in enumerate(dtypes) if d == dt], dt, device, ranges)
            for dt in dict.fromkeys(dtypes)]
