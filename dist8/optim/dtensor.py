"""DTensor (FSDP2 ``fully_shard``) parameters in dist8's optimizers.

:class:`dist8.optim.base.Optimizer8bit` delegates here for parameters that are
DTensors. The optimizer only ever touches plain local tensors: no DTensor reaches
a kernel.

Layout. Quantization blocks are laid out on the *global* flattened parameter, so
the quantized state does not depend on the world size. With ``Shard(0)`` a rank
holds global flat elements ``[g0, g1)``; the blocks wholly inside that range
("interior") are updated by the fused kernel of the backend, in place, on
contiguous views of the local shard. A block cut by a shard edge ("edge block",
at most one at each end of the shard, shared with the neighbouring rank(s)) is
updated with the rule specification (:func:`dist8.kernels.rules.apply_rule` on
values dequantized with the shared absmax); each rank's max |new state| of its
piece is combined with one all-reduce(MAX) per step for all edge blocks of all
parameters, and the piece is then quantized with that global absmax. State and
parameters are bitwise those of the unsharded optimizer on the full tensor.

Each rank stores codes with its local shard's shape and the absmax of the
blocks its elements overlap (edge blocks are held, with identical values, by
every rank that overlaps them).

Other placements ``Shard(d)``, ``d > 0`` (``shard_placement_fn``): the local
elements are strided in the global flat order, so every block may be shared.
The whole local shard is updated with the specification, the absmax of all the
parameter's blocks is combined by all-reduce(MAX) (4 bytes per block) and each
rank keeps the full absmax. Exact as well, but not on the fused kernel (slower);
use it for parameters where ``Shard(0)`` is not possible. ``Replicate`` mesh
dimensions (HSDP) are allowed; ``_StridedShard``, ``Partial`` and parameters
sharded on more than one mesh dimension raise ``NotImplementedError``.

State dict. :meth:`torch.optim.Optimizer.state_dict` presents codes (and 32-bit
state) as DTensors with the parameter's mesh and placements, and absmax as a
plain full-length tensor (gathered by an all-reduce(MAX); identical on every
rank). Loading takes any world size and placement: codes are redistributed to
the parameter's placement and the needed absmax entries are sliced. Since the
state is defined on the global parameter, resharding is exact.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from dist8.kernels import RULE_STATES, RULE_WRITES_UPDATE, Rule, apply_rule, get_backend
from dist8.quant import block_reciprocal, nearest_code, num_blocks

__all__ = [
    "is_dtensor",
    "local",
    "check_param",
    "attach",
    "init_state",
    "update",
    "EdgeBatch",
    "localize_state",
    "Layout",
    "layout_of",
]

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


def check_param(name: str, p: torch.Tensor) -> None:
    """Refuse FSDP1 flat parameters with a message that says what to use instead."""
    if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
        raise TypeError(_FSDP1_MSG.format(name=name))
    if is_dtensor(p):
        _shard_dim(p, name)  # validates the placements


# ---- layout ------------------------------------------------------------------------------------
def _shard_dim(p, name: str) -> tuple[int, int] | None:
    """``(mesh_dim, tensor_dim)`` of the one Shard placement, None if only Replicate."""
    from torch.distributed.tensor import Replicate, Shard

    found = None
    for mesh_dim, pl in enumerate(p.placements):
        if type(pl) is Shard:
            if found is not None:
                raise NotImplementedError(
                    f"parameter {name} is sharded on more than one mesh dimension ({p.placements}); dist8 supports "
                    "one Shard placement (FSDP2/HSDP) plus Replicate"
                )
            found = (mesh_dim, pl.dim)
        elif not isinstance(pl, Replicate):
            raise NotImplementedError(
                f"parameter {name} has placement {pl} ({p.placements}); dist8 supports Shard(d) and Replicate"
            )
    return found


def _chunk(size: int, parts: int, index: int) -> tuple[int, int]:
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
    # strided (Shard(d), d > 0): local shape seen as (outer, rows, inner) of the global (outer, dim, inner)
    dim: int = 0
    dim_size: int = 0
    dim_offset: int = 0
    group: Any = None  # process group over which the shards differ (None: nothing to reduce)

    def global_index(self) -> torch.Tensor:
        """Global flat index (int64) of every local element, in local flat order."""
        if self.contiguous:
            return torch.arange(self.g0, self.g1)
        shape = self.local_shape
        outer = 1
        for s in shape[: self.dim]:
            outer *= s
        inner = 1
        for s in shape[self.dim + 1:]:
            inner *= s
        a = torch.arange(outer).view(-1, 1, 1) * self.dim_size
        j = (torch.arange(shape[self.dim]) + self.dim_offset).view(1, -1, 1)
        return ((a + j) * inner + torch.arange(inner).view(1, 1, -1)).reshape(-1)

    def slice_global(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's shard of a tensor with the global shape."""
        if self.contiguous:
            return full.reshape(-1)[self.g0:self.g1].view(self.local_shape)
        return full.narrow(self.dim, self.dim_offset, self.local_shape[self.dim])


def layout_of(p, block: int, name: str = "?") -> Layout:
    """Layout of DTensor ``p`` for quantization blocks of ``block`` elements."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape = tuple(p.shape)
    n = p.numel()
    nb = num_blocks(n, block)
    local_shape = tuple(p.to_local().shape)
    sd = _shard_dim(p, name)
    if sd is None or n == 0:
        return Layout(n, block, nb, local_shape, True, 0, n, 0, nb, ())
    mesh_dim, dim = sd
    mesh = p.device_mesh
    parts = mesh.size(mesh_dim)
    coord = mesh.get_coordinate()[mesh_dim]
    group = mesh.get_group(mesh_dim)
    start, stop = _chunk(shape[dim], parts, coord)
    _, offset = compute_local_shape_and_global_offset(shape, mesh, p.placements)
    if local_shape[dim] != stop - start or (stop > start and offset[dim] != start):
        raise NotImplementedError(
            f"parameter {name}: local shard {local_shape} at offset {offset} is not the torch.chunk split "
            f"rows [{start}, {stop}) that dist8 assumes"
        )
    row = n // shape[dim] if shape[dim] else 0
    if dim == 0 or all(s == 1 for s in shape[:dim]):
        g0, g1 = start * row, stop * row
        cuts = {x // block for x in (_chunk(shape[dim], parts, r)[1] * row for r in range(parts - 1))
                if 0 < x < n and x % block}
        b0 = g0 // block
        b1 = num_blocks(g1, block) if g1 > g0 else b0
        return Layout(n, block, nb, local_shape, True, g0, g1, b0, b1, tuple(sorted(cuts)), group=group)
    return Layout(n, block, nb, local_shape, False, 0, 0, 0, nb, (), dim, shape[dim], start, group)


def _layout(opt, p, settings) -> Layout:
    cache = opt.__dict__.setdefault("_dist8_layouts", {})
    key = (id(p), settings.block_size)
    if key not in cache:
        cache[key] = layout_of(p, settings.block_size, settings.name)
    return cache[key]


# ---- state -------------------------------------------------------------------------------------
def init_state(opt, p, settings) -> dict[str, Any]:
    """Fresh state with the local shard's shape; absmax for the blocks the shard overlaps."""
    from dist8.optim.base import PERCENTILE_HISTORY

    lay = _layout(opt, p, settings)
    state: dict[str, Any] = {"step": 0}
    dev = p.device
    for i in range(1, len(RULE_STATES[opt.rule]) + 1):
        if settings.use_8bit:
            state[f"state{i}"] = torch.zeros(lay.local_shape, dtype=torch.uint8, device=dev)
            state[f"absmax{i}"] = torch.zeros(lay.b1 - lay.b0, dtype=torch.float32, device=dev)
        else:
            state[f"state{i}"] = torch.zeros(lay.local_shape, dtype=torch.float32, device=dev)
    if settings.hyper["percentile_clipping"] < 100:
        state["gnorm_vec"] = torch.zeros(PERCENTILE_HISTORY, dtype=torch.float32, device=dev)
    return state


# ---- the update ----------------------------------------------------------------------------------
def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


class _Job:
    """One 8-bit state of one parameter whose new absmax needs a cross-rank max."""

    def __init__(self, lay: Layout, codes, absmax, qmap, pieces, index=None):
        self.lay, self.codes, self.absmax, self.qmap = lay, codes, absmax, qmap
        self.pieces = pieces  # contiguous: [(lo, hi, block, new fp32 values)] in local flat coords
        self.index = index  # strided: global block of every local element

    def contribution(self) -> torch.Tensor:
        lay = self.lay
        if lay.contiguous:
            vec = torch.zeros(len(lay.shared), dtype=torch.float32, device=self.absmax.device)
            for _lo, _hi, blk, new in self.pieces:
                pos = lay.shared.index(blk)
                vec[pos] = torch.maximum(vec[pos], new.abs().max())
            return vec
        new = self.pieces[0][3]
        vec = torch.zeros(lay.nblocks, dtype=torch.float32, device=self.absmax.device)
        return vec.scatter_reduce_(0, self.index, new.abs(), "amax")

    def finish(self, vec: torch.Tensor) -> None:
        lay = self.lay
        if lay.contiguous:
            for lo, hi, blk, new in self.pieces:
                a = vec[lay.shared.index(blk)]
                self.codes[lo:hi] = nearest_code(new * block_reciprocal(a), self.qmap).to(torch.uint8)
                self.absmax[blk - lay.b0] = a
            return
        new = self.pieces[0][3]
        self.absmax.copy_(vec)
        self.codes.copy_(nearest_code(new * block_reciprocal(vec)[self.index], self.qmap).to(torch.uint8))


class EdgeBatch:
    """Edge blocks of one step: one all-reduce(MAX) per process group, then requantization."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []

    def add(self, job: _Job) -> None:
        self.jobs.append(job)

    def finish(self) -> None:
        import torch.distributed as dist

        jobs, self.jobs = self.jobs, []
        by_group: dict[Any, list[_Job]] = {}
        for job in jobs:
            by_group.setdefault(job.lay.group, []).append(job)
        for group, group_jobs in by_group.items():
            parts = [job.contribution() for job in group_jobs]
            sizes = [t.numel() for t in parts]
            if sum(sizes) == 0:
                continue
            vec = torch.cat([t.to(_comm_device(group)) for t in parts])
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
            for job, part in zip(group_jobs, torch.split(vec, sizes)):
                job.finish(part.to(job.absmax.device))


def _comm_device(group) -> torch.device:
    import torch.distributed as dist

    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dequant(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, blocks: torch.Tensor | int):
    return qmap[codes.long()] * absmax[blocks]


def update(opt, p, state: dict, settings, step: int, grad_scale: float, batch: EdgeBatch):
    """Update the local shard of DTensor ``p``; returns the local update direction (LAMB/LARS) or None."""
    if batch is None:
        raise RuntimeError(
            f"parameter {settings.name} is a DTensor added after the optimizer was created (add_param_group); "
            "create the optimizer with all its FSDP2 parameters"
        )
    lay = _layout(opt, p, settings)
    scalars, flags = opt._scalars(settings.hyper, step, grad_scale)
    signs = RULE_STATES[opt.rule]
    n_states = len(signs)
    p_local = p.detach().to_local()
    g_local = p.grad.detach().to_local()
    n = p_local.numel()
    writes_update = opt.rule in RULE_WRITES_UPDATE
    upd = torch.empty(n, dtype=torch.float32, device=p_local.device) if writes_update else None
    p_contig = p_local.is_contiguous()
    pf = _flat(p_local)
    gf = _flat(g_local)
    codes = [state[f"state{i}"].view(-1) for i in range(1, n_states + 1)]
    absmax = [state.get(f"absmax{i}") for i in range(1, n_states + 1)]
    qmaps = [opt.qmap(p_local.device, signs[i]) if settings.use_8bit else None for i in range(n_states)]
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
                jobs[i].append((a - g0, b - g0, blk, news[i]))
        if lay.shared:
            for i in range(n_states):
                batch.add(_Job(lay, codes[i], absmax[i], qmaps[i], jobs[i]))
    else:
        index = lay.global_index().to(p_local.device) // lay.block
        news = spec(0, n, index)
        for i in range(n_states):
            batch.add(_Job(lay, codes[i], absmax[i], qmaps[i], [(0, n, 0, news[i])], index))
    if not p_contig or pf.data_ptr() != p_local.data_ptr():
        p_local.copy_(pf.view(p_local.shape))
    return upd


# ---- cross-shard sums and attaching -----------------------------------------------------------------
def _sum_over(group):
    def reduce_partials(values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = values.to(_comm_device(group), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.to(values.device)

    return reduce_partials


def attach(opt) -> bool:
    """Prepare ``opt`` for DTensor parameters; returns False (and does nothing) when it has none.

    All parameters must then be DTensors sharded over one process group (one
    FSDP2 model): ``reduce_partials`` (non-finite flags, gradient norms for
    percentile clipping, LAMB/LARS norms) becomes an all-reduce(SUM) over it,
    and the state-dict hook presents the state globally.
    """
    params = [(opt.param_name(p), p) for g in opt.param_groups for p in g["params"]]
    dparams = [(name, p) for name, p in params if is_dtensor(p)]
    if not dparams:
        return False
    plain = [name for name, p in params if not is_dtensor(p)]
    if plain:
        raise TypeError(
            f"parameters {plain[:3]} are plain tensors while {dparams[0][0]} is a DTensor (FSDP2); one dist8 "
            "optimizer needs all its parameters sharded the same way: apply fully_shard to the root module too, "
            "or give the plain parameters their own optimizer"
        )
    groups = {}
    for name, p in dparams:
        sd = _shard_dim(p, name)
        group = p.device_mesh.get_group(sd[0]) if sd is not None else None
        groups.setdefault(group, name)
    if len(groups) > 1:
        names = list(groups.values())
        raise NotImplementedError(
            f"parameters {names[0]} and {names[1]} are sharded over different process groups (or one is only "
            "replicated); one dist8 optimizer supports one FSDP2 mesh: use one optimizer per mesh"
        )
    group = next(iter(groups))
    if group is not None and opt.reduce_partials is None:
        opt.reduce_partials = _sum_over(group)
    opt.register_state_dict_post_hook(_state_dict_post_hook)
    return True


def _group_of(opt, p) -> dict:
    for group in opt.param_groups:
        if any(q is p for q in group["params"]):
            return group
    raise KeyError(f"parameter {opt.param_name(p)} is in no param group")


def _state_dict_post_hook(opt, state_dict: dict) -> dict:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    id_to_param = {}
    for saved, group in zip(state_dict["param_groups"], opt.param_groups):
        id_to_param.update(zip(saved["params"], group["params"]))
    new_state = {}
    gathers: dict[Any, list] = {}
    for key, st in state_dict["state"].items():
        p = id_to_param.get(key)
        if p is None or not is_dtensor(p):
            new_state[key] = st
            continue
        settings = opt.settings(p, _group_of(opt, p))
        lay = _layout(opt, p, settings)
        st = dict(st)
        for i in range(1, len(RULE_STATES[opt.rule]) + 1):
            s = st.get(f"state{i}")
            if isinstance(s, torch.Tensor) and not is_dtensor(s):
                st[f"state{i}"] = DTensor.from_local(s, p.device_mesh, p.placements, run_check=False,
                                                     shape=p.shape, stride=p.stride())
            a = st.get(f"absmax{i}")
            if isinstance(a, torch.Tensor) and lay.contiguous and lay.group is not None:
                full = torch.zeros(lay.nblocks, dtype=torch.float32, device=a.device)
                full[lay.b0:lay.b1] = a
                st[f"absmax{i}"] = full
                gathers.setdefault(lay.group, []).append((st, f"absmax{i}"))
        new_state[key] = st
    for group, entries in gathers.items():
        if group is None:
            continue
        parts = [st[k] for st, k in entries]
        vec = torch.cat(parts).to(_comm_device(group))
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
        for (st, k), part in zip(entries, torch.split(vec, [t.numel() for t in parts])):
            st[k] = part.to(st[k].device)
    state_dict["state"] = new_state
    return state_dict


def has_dtensor(st: dict) -> bool:
    return any(is_dtensor(v) for v in st.values())


def localize_state(opt, p, st: dict[str, Any]) -> dict[str, Any]:
    """Turn loaded state of global shape (DTensor or plain) into this rank's local state of ``p``."""
    name = opt.param_name(p)
    if not is_dtensor(p):
        return {k: (v.full_tensor() if is_dtensor(v) else v) for k, v in st.items()}
    settings = opt.settings(p, _group_of(opt, p))
    lay = _layout(opt, p, settings)
    out = dict(st)
    for key, v in st.items():
        if not isinstance(v, torch.Tensor):
            continue
        if key.startswith("state"):
            if is_dtensor(v):
                if v.device_mesh != p.device_mesh or tuple(v.placements) != tuple(p.placements):
                    v = v.redistribute(p.device_mesh, p.placements)
                v = v.to_local()
            else:
                v = lay.slice_global(v)
            if tuple(v.shape) != lay.local_shape:
                raise ValueError(f"{key} of parameter {name}: local shard {tuple(v.shape)}, expected {lay.local_shape}")
            out[key] = v.to(p.device).contiguous().clone()
        elif key.startswith("absmax"):
            if is_dtensor(v):
                v = v.full_tensor()
            if v.numel() != lay.nblocks:
                raise ValueError(
                    f"{key} of parameter {name} has {v.numel()} entries; the parameter ({lay.numel} elements in "
                    f"blocks of {lay.block}) has {lay.nblocks} blocks (saved with another block_size?)"
                )
            out[key] = v.reshape(-1)[lay.b0:lay.b1].to(p.device, torch.float32).clone()
        elif is_dtensor(v):
            out[key] = v.full_tensor()
    return out
