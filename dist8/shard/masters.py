"""The fp32 master copies of :class:`dist8.shard.ShardedOptimizer`'s 16-bit parameters.

One copy per flat buffer of bf16/fp16 parameters, of the range this rank owns (4 bytes per owned
value), when ``master_weight_bits`` is None; fp32 buffers and ``master_weight_bits=24|32`` (whose
correction is inner-optimizer state) have none. The step updates a copy and writes its rounding into
the parameters; the parameters stay the truth (:meth:`MasterCopies.follow_writes`).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from dist8.shard.flat import FlatBuffer

__all__ = ["MasterCopies"]


class MasterCopies:
    """fp32 copies of the owned ranges of 16-bit flat buffers.

    Args:
        buffers: the optimizer's flat parameter buffers (one per dtype).
        rank: this rank (its owned range of each buffer).
        master_weight_bits: the optimizer's setting; not None means no copies (the correction holds
            the extra precision instead).
    """

    def __init__(self, buffers: Sequence[FlatBuffer], rank: int, master_weight_bits: int | None) -> None:
        self.buffers = list(buffers)
        self.rank = rank
        self.copies: list[torch.Tensor | None] = [
            buf.owned(rank).float() if buf.dtype != torch.float32 and master_weight_bits is None else None
            for buf in self.buffers]
        # the parameters' version counters when the copies last matched them (None: compare at the next look)
        self.versions: list[int] | None = None

    def __getitem__(self, k: int) -> torch.Tensor | None:
        """Buffer ``k``'s copy, or None."""
        return self.copies[k]

    def __iter__(self) -> Iterator[torch.Tensor | None]:
        return iter(self.copies)

    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.copies if m is not None)

    def refresh(self) -> None:
        """Set the copies from the (16-bit) parameters they shadow."""
        for buf, master in zip(self.buffers, self.copies):
            if master is not None:
                master.copy_(buf.owned(self.rank))

    def snapshot(self) -> list[torch.Tensor | None]:
        """Clones of the copies (for :meth:`restore`)."""
        return [m.clone() if m is not None else None for m in self.copies]

    def restore(self, snapshot: list[torch.Tensor | None]) -> None:
        for master, saved in zip(self.copies, snapshot):
            if master is not None:
                master.copy_(saved)
        self.versions = None

    def write_back(self) -> None:
        """After a step: the owned parameter values take their copies' rounding."""
        for buf, master in zip(self.buffers, self.copies):
            if master is not None:
                buf.owned(self.rank).copy_(master)

    def follow_writes(self, params: Sequence[torch.Tensor]) -> None:
        """The copies follow 16-bit parameter values written in place since the last look.

        The step updates a copy and writes its rounding into the parameter; a value written into the
        parameter by anyone else (``model.load_state_dict`` after the optimizer was built, a resume
        whose optimizer state holds no masters, torch DCP, a clamp under ``no_grad``) was overwritten
        by the next step from the stale copy: the model went back to the values it had when the
        optimizer was built, silently. The parameters are the truth, the copies their extra
        precision: an element whose parameter no longer equals its copy's rounding takes the
        parameter's value. Compared on the first look after construction or any load (``versions``
        None) and whenever a parameter's version counter moved (writes through the parameter
        object); the step's own writes go through the flat buffers and move none.
        """
        if all(master is None for master in self.copies):
            return
        versions = [p._version for p in params]
        if versions == self.versions:
            return
        for buf, master in zip(self.buffers, self.copies):
            if master is not None:
                owned = buf.owned(self.rank)
                written = owned != master.to(owned.dtype)
                if written.any():
                    master.copy_(torch.where(written, owned.float(), master))
        self.versions = versions
