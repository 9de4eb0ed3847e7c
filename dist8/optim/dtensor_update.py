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

Non-finite blocks (see :mod:`dist8.kernels.rules`): a piece whose new states or outputs are
not all finite contributes +inf to its block's max, so every rank holding part of the block
sees the block as skipped and keeps its codes, absmax and parameter values (the outputs of an
edge piece are written only after the all-reduce). The rank holding the block's first
element counts it, so skip counts sum over ranks to the unsharded run's.

32-bit state (parameters under ``min_8bit_size``, ``optim_bits=32``) takes the same paths: it
needs no absmax, but a skip is decided per global block, so an edge block is skipped on every
rank that holds part of it or on none (the all-reduced max is only read for being +inf).

Other placements ``Shard(d)``, ``d > 0``: the local elements are strided in the global flat
order, so every block may be shared. The whole local shard is updated with the
specification, the absmax of all the parameter's blocks is combined by all-reduce(MAX) and
each rank keeps the full absmax. Exact as well, but not on the fused kernel (slower).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dist8.kernels import RULE_WRITES_UPDATE, Rule, get_backend
from dist8.kernels.rules import apply_rule_states, state_floor_fraction, state_floored
from dist8.optim.dtensor import layout_for
from dist8.optim.dtensor_layout import Layout, comm_device, counts_skips
from dist8.optim.state_schema import CORRECTION, absmax_key, is_signed, state_key
from dist8.optim.state_schema import n_states as n_states_of
from dist8.quant import block_reciprocal, nearest_code, num_blocks
from dist8.quant.master import decode_master, encode_master

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit, ParamSettings

__all__ = ["EdgePiece", "EdgeJob", "EdgeBatch", "update"]

def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


class EdgePiece(NamedTuple):
    """Part of one block held by this rank: local flat ``[lo, hi)`` of global block ``block``, new fp32 values.

    ``bad``: per value, a new state or output of it is non-finite (the block is then skipped).
    ``counted_here``: this rank holds the block's first element (it counts a skip).
    """

    lo: int
    hi: int
    block: int
    values: torch.Tensor
    bad: torch.Tensor
    counted_here: bool = True


@dataclass
class EdgeOutputs:
    """The new outputs of a parameter's edge pieces, written once their blocks are known committed."""

    target: torch.Tensor  # flat parameter shard (or update direction) they go to
    values: list[torch.Tensor]  # one per piece of the job they belong to
    zero_skipped: bool  # LAMB/LARS: a skipped block's update direction is 0 (else the parameter stays)
    flush: Any = None  # callable run after writing (copies a non-contiguous shard back)
    name: str = ""
    counter: Any = None  # dist8.optim.nonfinite.SkipCounter
    correction: torch.Tensor | None = None  # flat local master-weight correction: outputs are fp32 masters

    def write(self, lo: int | None, hi: int | None, values: torch.Tensor) -> None:
        """``target[lo:hi] = values`` (fp32 masters encoded into parameter + correction when there is one)."""
        if self.correction is None:
            self.target[lo:hi] = values
            return
        bits = 24 if self.correction.dtype == torch.int8 else 32
        rounded, correction = encode_master(values.float().contiguous(), self.target.dtype, bits)
        self.target[lo:hi] = rounded
        self.correction[lo:hi] = correction


@dataclass
class EdgeJob:
    """One state of one parameter whose shared blocks need a cross-rank max: the new absmax of an 8-bit
    state, whether the block is skipped for both kinds."""

    lay: Layout
    codes: torch.Tensor  # the state: uint8 codes, or fp32 values for a 32-bit state (qmap None)
    absmax: torch.Tensor | None
    qmap: torch.Tensor | None
    pieces: list[EdgePiece]  # contiguous: the edge pieces; strided: one piece with the whole shard
    index: torch.Tensor | None = None  # strided: global block of every local element
    outputs: EdgeOutputs | None = None  # on the job of the parameter's first state

    def contribution(self) -> torch.Tensor:
        """Per shared block: max |new value| of this rank's piece, +inf where the piece has a non-finite value."""
        lay = self.lay
        inf = torch.tensor(float("inf"), dtype=torch.float32, device=self.codes.device)
        if lay.contiguous:
            vec = torch.zeros(len(lay.shared), dtype=torch.float32, device=self.codes.device)
            for piece in self.pieces:
                pos = lay.shared.index(piece.block)
                mx = inf if bool(piece.bad.any()) else piece.values.abs().max()
                vec[pos] = torch.maximum(vec[pos], mx)
            return vec
        new, bad = self.pieces[0].values, self.pieces[0].bad
        vec = torch.zeros(lay.nblocks, dtype=torch.float32, device=self.codes.device)
        vec.scatter_reduce_(0, self.index, torch.where(bad, inf, new.abs()), "amax")
        return vec

    def finish(self, vec: torch.Tensor) -> None:
        """Quantize with the global absmax ``vec``; blocks whose absmax is +inf are skipped."""
        lay, out = self.lay, self.outputs
        if lay.contiguous:
            for k, (lo, hi, blk, new, _bad, counted_here) in enumerate(self.pieces):
                a = vec[lay.shared.index(blk)]
                ok = bool(torch.isfinite(a))
                if ok and self.qmap is None:
                    self.codes[lo:hi] = new
                elif ok:
                    self.codes[lo:hi] = nearest_code(new * block_reciprocal(a), self.qmap).to(torch.uint8)
                    self.absmax[blk - lay.b0] = a
                if out is not None:
                    if ok:
                        out.write(lo, hi, out.values[k])
                    elif out.zero_skipped:
                        out.target[lo:hi] = 0
                    if not ok and counted_here and out.counter is not None:
                        out.counter.add_blocks([out.name], torch.ones(1, dtype=torch.int64))
        else:
            new = self.pieces[0].values
            skipped = ~torch.isfinite(vec)
            keep = skipped[self.index]
            if self.qmap is None:
                self.codes.copy_(torch.where(keep, self.codes, new))
            else:
                self.codes.copy_(torch.where(keep, self.codes, nearest_code(new * block_reciprocal(vec)[self.index],
                                                                              self.qmap).to(torch.uint8)))
                self.absmax.copy_(torch.where(skipped, self.absmax, vec))
            if out is not None:
                if out.correction is not None:  # skipped blocks keep their (parameter, correction) pairs
                    bits = 24 if out.correction.dtype == torch.int8 else 32
                    rounded, correction = encode_master(out.values[0].float().contiguous(), out.target.dtype, bits)
                    out.target.copy_(torch.where(keep, out.target, rounded))
                    out.correction.copy_(torch.where(keep, out.correction, correction))
                else:
                    old = torch.zeros_like(out.values[0]) if out.zero_skipped else out.target
                    out.target.copy_(torch.where(keep, old, out.values[0]).to(out.target.dtype))
                if self.pieces[0].counted_here and out.counter is not None:
                    out.counter.add_blocks([out.name], skipped.sum().reshape(1).to(torch.int64))
        if out is not None and out.flush is not None:
            out.flush()


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
                job.finish(part.to(job.codes.device))


def _dequant(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, blocks: torch.Tensor | int,
             floored: bool) -> torch.Tensor:
    """The kernels' read of 8-bit state (second-moment-like states with their floor)."""
    scale = absmax[blocks]
    values = qmap[codes.long()] * scale
    if floored:
        floor = torch.tensor(state_floor_fraction(qmap), dtype=torch.float32, device=values.device) * scale
        values = torch.where(values < floor, floor, values)
    return values


def update(opt: Optimizer8bit, p, state: dict, settings: ParamSettings, step: int, grad_scale: float,
           batch: EdgeBatch | None) -> torch.Tensor | None:
    """Update the local shard of DTensor ``p``; returns the local update direction (LAMB/LARS) or None."""
    if batch is None:
        raise RuntimeError(
            f"parameter {settings.name} is a DTensor added after the optimizer was created (add_param_group); "
            "create the optimizer with all its FSDP2 parameters"
        )
    lay = layout_for(opt, p, settings)
    # replicas (HSDP's replicate dimension, tensor parallelism) skip the same blocks: the first counts them
    counter = opt.skip_counter if counts_skips(p, whole=False) else None
    scalars, flags = opt.kernel_scalars(settings.hyper, step, grad_scale)
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
    target = upd if upd is not None else pf
    corr = state.get(CORRECTION)
    cf = corr.view(-1) if corr is not None else None  # local, contiguous (made so by init/localize)

    def kernel(lo: int, hi: int, a_lo: int, a_hi: int) -> None:
        skipped = torch.zeros(1, dtype=torch.int64, device=p_local.device)
        backend.fused_update(
            opt.rule, pf[lo:hi], gf[lo:hi], codes[0][lo:hi], codes[1][lo:hi] if n_states >= 2 else None,
            absmax[0][a_lo:a_hi] if absmax[0] is not None else None,
            absmax[1][a_lo:a_hi] if n_states >= 2 and absmax[1] is not None else None,
            qmaps[0], qmaps[1] if n_states >= 2 else None, scalars, flags, settings.block_size,
            upd[lo:hi] if upd is not None else None, skipped,
            **({"correction": cf[lo:hi]} if cf is not None else {}),
            **({"state3": codes[2][lo:hi], "absmax3": absmax[2][a_lo:a_hi] if absmax[2] is not None else None}
               if n_states > 2 else {}),
        )
        if counter is not None:
            counter.add_blocks([settings.name], skipped)

    def spec(lo: int, hi: int, blocks) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(new outputs, per-value non-finite flag, new states) of local ``[lo, hi)``; nothing written."""
        olds = [_dequant(codes[i][lo:hi], absmax[i], qmaps[i], blocks, state_floored(opt.rule, i))
                if settings.use_8bit else codes[i][lo:hi] for i in range(n_states)]
        master = decode_master(pf[lo:hi], cf[lo:hi]) if cf is not None else pf[lo:hi].float()
        out, news = apply_rule_states(Rule(opt.rule), master, gf[lo:hi].float(), olds, scalars, flags)
        bad = ~torch.isfinite(out)
        for t in news:
            bad |= ~torch.isfinite(t)
        return out, bad, news

    def copy_back() -> None:
        if not p_contig or pf.data_ptr() != p_local.data_ptr():
            p_local.copy_(pf.view(p_local.shape))

    if lay.contiguous:
        B, g0, g1 = lay.block, lay.g0, lay.g1
        pieces, lo, hi = [], g0, g1
        if g0 % B and g1 > g0:  # an empty shard (fewer rows than ranks) holds no piece of any block
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
        outs = EdgeOutputs(target, [], upd is not None, copy_back, settings.name, counter,
                           cf if upd is None else None)
        for a, b, blk in pieces:
            out, bad, news = spec(a - g0, b - g0, blk - lay.b0)
            outs.values.append(out)
            for i in range(n_states):
                jobs[i].append(EdgePiece(a - g0, b - g0, blk, news[i], bad, a % B == 0))
        if lay.shared:
            for i in range(n_states):
                batch.add(EdgeJob(lay, codes[i], absmax[i], qmaps[i], jobs[i], outputs=outs if i == 0 else None))
    elif lay.block_index is not None:  # runs of whole blocks: the fused kernel on the whole shard, no edges
        if n:
            kernel(0, n, 0, lay.b1)
    else:
        import torch.distributed as dist

        index = lay.global_index().to(p_local.device) // lay.block
        out, bad, news = spec(0, n, index)
        outs = EdgeOutputs(target, [out], upd is not None, copy_back, settings.name, counter,
                           cf if upd is None else None)
        first = dist.get_rank(lay.group) == 0  # every block is shared: one rank counts
        for i in range(n_states):
            batch.add(EdgeJob(lay, codes[i], absmax[i], qmaps[i], [EdgePiece(0, n, 0, news[i], bad, first)], index,
                              outputs=outs if i == 0 else None))
    copy_back()
    return upd


