"""Stage 1's precondition, checked at its first step with gradients: every rank holds the same ones.

``ShardedOptimizer(stage=1)`` updates each rank's blocks with that rank's ``.grad`` and all-gathers
the result, so it relies on the gradients being averaged across ranks already (DDP does that).
Without it each block is trained on its owner's batch alone, and nothing fails: the loss still goes
down. Gradients averaged by an all-reduce are bitwise equal on every rank, so an exact fingerprint
per parameter -- the integer sum of its gradient's bits (order-independent, so any reduction order
gives the same number), or a mark for no gradient -- compared across ranks tells the two apart, for
one read of the gradients and one all-reduce of two integers per parameter, once.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["gradient_fingerprints", "first_difference"]

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_NO_GRAD = -(2**62)  # a parameter without a gradient (a sum of int32 bits over < 2^31 values never reaches it)
_SPARSE = -(2**62) + 1  # a sparse gradient: not fingerprinted (dist8's optimizers refuse it at the step)


def gradient_fingerprints(grads: Sequence[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    """One int64 per gradient on ``device``: the sum of its elements' bits as integers, or a mark for
    ``None`` (and for a sparse gradient)."""
    out = []
    for g in grads:
        if g is None or g.is_sparse:
            out.append(torch.tensor(_NO_GRAD if g is None else _SPARSE, dtype=torch.int64, device=device))
        else:
            bits = g.detach().contiguous().view(_BITS[g.element_size()])
            out.append(bits.sum(dtype=torch.int64).to(device))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.int64, device=device)


def first_difference(fingerprints: torch.Tensor, group: dist.ProcessGroup | None) -> int | None:
    """The first index whose fingerprint is not the same on every rank of ``group``, else None
    (collective). Max of x and of ~x (= -x - 1, no overflow) give the max and the min in one call."""
    n = fingerprints.numel()
    both = torch.cat([fingerprints, torch.bitwise_not(fingerprints)])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    differ = (both[:n] != torch.bitwise_not(both[n:])).nonzero()
    return int(differ[0]) if differ.numel() else None
