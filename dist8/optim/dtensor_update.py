"""The update of DTensor (FSDP2) parameter shards: interior blocks on the fused kernel, shard-edge
blocks with the rule specification and one all-reduce(MAX) of their absmax per step.

Layout. Quantization blocks are laid out on the *global* flattened parameter, so the
quantized state does not depend on the world size. With ``Shard(0)`` a rank holds global
flat elements ``[g0, g1)``; the blocks wholly inside that range ("interior") are updated by
the fused kernel of the backend, in place, on contiguous views of the local shard. A block
cut by a shard edge ("edge block", at most one at each end of the shard, shared with the
neighbouring rank(s)) is updated with the rule specification
(:func:`dist8.kernels.rules.apply_rule` on values dequantized with the shared absmax); each
rank's max |new state| of its piece is combined with one all-reduce(MAX) per step for all
edge blocks of all parameters, and the piece is then quantized with that global absmax.
State and parameters are bitwise those of the unsharded optimizer on the full tensor.

Other placements ``Shard(d)``, ``d > 0``: the local elements are strided in the global flat
order, so every block may be shared. The whole local shard is updated with the
specification, the absmax of all the parameter's blocks is combined by all-reduce(MAX) and
each rank keeps the full absmax. Exact as well, but not on the fused kernel (slower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dist8.kernels import RULE_WRITES_UPDATE, Rule, apply_rule, get_backend
from dist8.optim.dtensor import layout_for
from dist8.optim.dtensor_layout import Layout, comm_device
from dist8.optim.state_schema import absmax_key, is_signed, state_key
from dist8.optim.state_schema import n_states as n_states_of
from dist8.quant import block_reciprocal, nearest_code, num_blocks

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit, ParamSettings

__all__ = ["EdgePiece", "EdgeJob", "EdgeBatch", "update"]

def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


class EdgePiece(NamedTuple):
    """Part of one block held by this rank: local flat ``[lo, hi)`` of global block ``block``, new fp32 values."""

    lo: int
    hi: int
    block: int
    values: torch.Tensor


@dataclass
class EdgeJob:
    """One 8-bit state of one parameter whose new absmax needs a cross-rank max."""

    lay: Layout
    codes: torch.Tensor
    absmax: torch.Tensor
    qmap: torch.Tensor
    pieces: list[EdgePiece]  # contiguous: the edge pieces; strided: one piece with the whole shard
    index: torch.Tensor | None = None  # strided: global block of every local element

    def contribution(self) -> torch.Tensor:
        lay = self.lay
        if lay.contiguous:
            vec = torch.zeros(len(lay.shared), dtype=torch.float32, device=self.absmax.device)
            for piece in self.pieces:
                pos = lay.shared.index(piece.block)
                vec[pos] = torch.maximum(vec[pos], piece.values.abs().max())
            return vec
        new = self.pieces[0].values
        vec = torch.zeros(lay.nblocks, dtype=torch.float32, device=self.absmax.device)
        return vec.scatter_reduce_(0, self.index, new.abs(), "amax")

    def finish(self, vec: torch.Tensor) -> None:
        lay = self.lay
        if lay.contiguous:
            for lo, hi, blk, new in self.pieces:  # noqa: B007 (EdgePiece fields)
                a = vec[lay.shared.index(blk)]
                self.codes[lo:hi] = nearest_code(new * block_reciprocal(a), self.qmap).to(torch.uint8)
                self.absmax[blk - lay.b0] = a
            return
        new = self.pieces[0].values
        self.absmax.copy_(vec)
        self.codes.copy_(nearest_code(new * block_reciprocal(vec)[self.index], self.qmap).to(torch.uint8))


class EdgeBatch:
    """Edge blocks of one step: one all-reduce(MAX) per process group, then requantization."""

    def __init__(self) -> None:
        self.jobs: list[EdgeJob] = []

    def add(self, job: EdgeJob) -> None:
        self.jobs.append(job)

    def finish(self) -> None:
        import torch.distributed as dist

        jobs, self.jobs = self.jobs, []
        by_group: dict[Any, list[EdgeJob]] = {}
        for job in jobs:
            by_group.setdefault(job.lay.group, []).append(job)
        for group, group_jobs in by_group.items():
            parts = [job.contribution() for job in group_jobs]
            sizes = [t.numel() for t in parts]
            if sum(sizes) == 0:
                continue
            vec = torch.cat([t.to(comm_device(group)) for t in parts])
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
            for job, part in zip(group_jobs, torch.split(vec, sizes)):
                job.finish(part.to(job.absmax.device))


def _dequant(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, blocks: torch.Tensor | int):
    return qmap[codes.long()] * absmax[blocks]


def update(opt: Optimizer8bit, p, state: dict, settings: ParamSettings, step: int, grad_scale: float,
           batch: EdgeBatch | None) -> torch.Tensor | None:
    """Update the local shard of DTensor ``p``; returns the local update direction (LAMB/LARS) or None."""
    if batch is None:
        raise RuntimeError(
            f"parameter {settings.name} is a DTensor added after the optimizer was created (add_param_group); "
            "create the optimizer with all its FSDP2 parameters"
        )
    lay = layout_for(opt, p, settings)
    scalars, flags = opt.scalars(settings.hyper, step, grad_scale)
    n_states = n_states_of(opt.rule)
    p_local = p.detach().to_local()
    g_local = p.grad.detach().to_local()
    n = p_local.numel()
    writes_update = opt.rule in RULE_WRITES_UPDATE
    upd = torch.empty(n, dtype=torch.float32, device=p_local.device) if writes_update else None
    p_contig = p_local.is_contiguous()
    pf = _flat(p_local)
    gf = _flat(g_local)
    codes = [state[state_key(i)].view(-1) for i in range(1, n_states + 1)]
    absmax = [state.get(absmax_key(i)) for i in range(1, n_states + 1)]
    qmaps = [opt.qmap(p_local.device, is_signed(opt.rule, i + 1)) if settings.use_8bit else None for i in range(n_states)]
    backend = get_backend(p_local.device)

    def kernel(lo: int, hi: int, a_lo: int, a_hi: int) -> None:
        backend.fused_update(
            opt.rule, pf[lo:hi], gf[lo:hi], codes[0][lo:hi], codes[1][lo:hi] if n_states == 2 else None,
            absmax[0][a_lo:a_hi] if absmax[0] is not None else None,
            absmax[1][a_lo:a_hi] if n_states == 2 and absmax[1] is not None else None,
            qmaps[0], qmaps[1] if n_states == 2 else None, scalars, flags, settings.block_size,
            upd[lo:hi] if upd is not None else None,
        )

    def spec(lo: int, hi: int, blocks) -> list[torch.Tensor]:
        olds = [_dequant(codes[i][lo:hi], absmax[i], qmaps[i], blocks) for i in range(n_states)]
        out, s1, s2 = apply_rule(Rule(opt.rule), pf[lo:hi].float(), gf[lo:hi].float(), olds[0],
                                 olds[1] if n_states == 2 else None, scalars, flags)
        (upd if upd is not None else pf)[lo:hi] = out
        return [s1, s2][:n_states]

    if not settings.use_8bit:
        if n:
            kernel(0, n, 0, 0)
    elif lay.contiguous:
        B, g0, g1 = lay.block, lay.g0, lay.g1
        pieces, lo, hi = [], g0, g1
        if g0 % B:
            end = min(g1, (g0 // B + 1) * B)
            pieces.append((g0, end, g0 // B))
            lo = end
        if lo < g1 and g1 % B and g1 != lay.numel:
            start = max(lo, (g1 // B) * B)
            pieces.append((start, g1, g1 // B))
            hi = start
        if hi > lo:
            kernel(lo - g0, hi - g0, lo // B - lay.b0, num_blocks(hi, B) - lay.b0)
        jobs = [[] for _ in range(n_states)]
        for a, b, blk in pieces:
            news = spec(a - g0, b - g0, blk - lay.b0)
            for i in range(n_states):
                jobs[i].append(EdgePiece(a - g0, b - g0, blk, news[i]))
        if lay.shared:
            for i in range(n_states):
                batch.add(EdgeJob(lay, codes[i], absmax[i], qmaps[i], jobs[i]))
    else:
        index = lay.global_index().to(p_local.device) // lay.block
        news = spec(0, n, index)
        for i in range(n_states):
            batch.add(EdgeJob(lay, codes[i], absmax[i], qmaps[i], [EdgePiece(0, n, 0, news[i])], index))
    if not p_contig or pf.data_ptr() != p_local.data_ptr():
        p_local.copy_(pf.view(p_local.shape))
    return upd


