"""Block layout: where every quantization block of every parameter lives, and which rank owns it.

The layout is a pure function of the parameters' names and shapes and the
block size; partitioning it for N ranks is a pure function of the layout and N.
Each parameter starts on a block boundary (its element count is padded up to
whole blocks), so blocks never cross parameters, and rank boundaries fall on
block boundaries.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dist8.quant import check_block_size, num_blocks

__all__ = ["BlockLayout", "ParamSlot", "Piece"]


@dataclass(frozen=True)
class ParamSlot:
    """One parameter in the flat, block-padded index space."""

    index: int
    name: str
    shape: tuple[int, ...]
    numel: int
    first_block: int
    n_blocks: int


@dataclass(frozen=True)
class Piece:
    """The part of one parameter owned by one rank: elements ``[start, stop)`` of the flattened parameter."""

    param: int
    start: int
    stop: int
    first_block: int  # block index within the parameter

    @property
    def numel(self) -> int:
        return self.stop - self.start


class BlockLayout:
    """Flat layout of parameters in whole blocks of ``block_size`` elements."""

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], block_size: int = 256) -> None:
        check_block_size(block_size)
        if len(names) != len(shapes):
            raise ValueError(f"got {len(names)} names for {len(shapes)} shapes")
        if len(set(names)) != len(names):
            dup = next(n for n in names if list(names).count(n) > 1)
            raise ValueError(f"parameter name {dup!r} appears twice")
        self.block_size = block_size
        self.params: list[ParamSlot] = []
        block = 0
        for i, (name, shape) in enumerate(zip(names, shapes)):
            shape = tuple(int(s) for s in shape)
            numel = math.prod(shape)
            nb = num_blocks(numel, block_size)
            self.params.append(ParamSlot(i, name, shape, numel, block, nb))
            block += nb
        self.total_blocks = block

    @property
    def total_elements(self) -> int:
        """Size of the padded flat space."""
        return self.total_blocks * self.block_size

    def element_offset(self, param: int) -> int:
        return self.params[param].first_block * self.block_size

    def block_ranges(self, world_size: int) -> list[tuple[int, int]]:
        """Contiguous block range ``[first, last)`` of each rank; sizes differ by at most one block."""
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        t = self.total_blocks
        return [(r * t // world_size, (r + 1) * t // world_size) for r in range(world_size)]

    def pieces(self, rank: int, world_size: int) -> list[Piece]:
        """The parameter pieces rank ``rank`` owns (element ranges within each parameter)."""
        lo, hi = self.block_ranges(world_size)[rank]
        out = []
        for slot in self.params:
            a, b = max(lo, slot.first_block), min(hi, slot.first_block + slot.n_blocks)
            if a >= b:
                continue
            first = a - slot.first_block
            start = first * self.block_size
            stop = min((b - slot.first_block) * self.block_size, slot.numel)
            out.append(Piece(slot.index, start, stop, first))
        return out

    def shard_elements(self, rank: int, world_size: int) -> int:
        """Real (unpadded) elements owned by ``rank``."""
        return sum(p.numel for p in self.pieces(rank, world_size))

    def fingerprint(self) -> str:
        """sha256 of (names, shapes, block size): equal on every rank that holds the same model."""
        payload = json.dumps([self.block_size, [(p.name, p.shape) for p in self.params]])
        return hashlib.sha256(payload.encode()).hexdigest()

    def describe(self) -> dict:
        """JSON-able description (stored in checkpoints)."""
        return {
            "block_size": self.block_size,
            "params": [{"name": p.name, "shape": list(p.shape), "first_block": p.first_block, "n_blocks": p.n_blocks}
                       for p in self.params],
        }

    def __repr__(self) -> str:
        return f"BlockLayout({len(self.params)} params, {self.total_blocks} blocks of {self.block_size})"

    def table(self, world_size: int, state_bytes_per_element: float = 2.0, absmax_per_block: int = 2) -> str:
        """Per-rank block ranges and optimizer-state bytes (default: Adam, 2 codes + 2 absmax)."""
        lines = [f"{self!r} on {world_size} ranks:"]
        for r, (a, b) in enumerate(self.block_ranges(world_size)):
            n = self.shard_elements(r, world_size)
            nbytes = int(n * state_bytes_per_element + (b - a) * 4 * absmax_per_block)
            lines.append(f"  rank {r}: blocks [{a}, {b}) elements {n} state bytes {nbytes}")
        return "\n".join(lines)
