"""DTensor (FSDP2 ``fully_shard``) parameters in dist8's optimizers: state, attaching, agreement, state dicts.

One concern, hence its length: what the optimizer does for DTensor parameters besides their update
(the ranks' shared setup and checks, and the state presented globally).

:class:`dist8.optim.base.Optimizer8bit` delegates here for parameters that are DTensors; the
optimizer only ever touches plain local tensors, no DTensor reaches a kernel. Where a shard
lies in the global parameter: :mod:`dist8.optim.dtensor_layout`; the update of a shard and
its edge blocks: :mod:`dist8.optim.dtensor_update`.

Each rank stores codes with its local shard's shape and the absmax of the blocks its elements
overlap (edge blocks are held, with identical values, by every rank that overlaps them).
``Replicate`` mesh dimensions (HSDP) are allowed, and so are parameters only replicated over the
ranks the others are sharded over (tensor parallelism's biases and norms) and parameters sharded on
several mesh dimensions of a mesh of all ranks (FSDP + TP, ``_StridedShard`` included: each shard
is the box of the global tensor torch's DCP reads it as); ``Partial`` raises ``NotImplementedError``.

State dict. :meth:`torch.optim.Optimizer.state_dict` presents codes (and 32-bit state) as
DTensors with the parameter's mesh and placements, and absmax as a plain full-length tensor
(gathered by an all-reduce(MAX); identical on every rank). Loading takes any world size and
placement: codes are redistributed to the parameter's placement and the needed absmax entries
are sliced. Since the state is defined on the global parameter, resharding is exact.

Agreement. Unlike torch's optimizers, the step is collective, so the ranks must step the same
parameters with the same settings: :func:`agree_on_step` (one small all-reduce per step) refuses a
step on every rank, before anything is made or updated, when they do not, naming the first setting
or the parameter (a gradient missing on some ranks only) that differs.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any


import torch

from dist8.optim.comparable import comparable, stable_hash
from dist8.optim.dtensor_layout import (Layout, box_of, comm_device, full_tensor, is_dtensor, layout_of,
                                       one_plain_shard, shard_dims, world_group)
from dist8.optim.state_schema import (CORRECTION, absmax_key, is_absmax_key, is_state_key, new_state, state_indices,
                                      state_key)

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit, ParamSettings

__all__ = ["layout_for", "init_state", "align_grad", "agree_on_step", "attach", "detach", "has_dtensor_params",
           "localize_state"]


def layout_for(opt: Optimizer8bit, p, settings: ParamSettings) -> Layout:
    """The layout of DTensor ``p`` for its effective block size (cached in ``opt.dtensor_layouts``)."""
    key = (id(p), settings.block_size)
    cache = opt.dtensor_layouts
    if key not in cache:
        cache[key] = layout_of(p, settings.block_size, settings.name, opt.dtensor_boxes.get(id(p)))
    return cache[key]


# ---- state -------------------------------------------------------------------------------------
def init_state(opt: Optimizer8bit, p, settings: ParamSettings) -> dict[str, Any]:
    """Fresh state with the local shard's shape; absmax for the blocks the shard overlaps; the
    master-weight correction (elementwise) of the local shard."""
    lay = layout_for(opt, p, settings)
    return new_state(opt.rule, lay.local_shape, lay.b1 - lay.b0, settings.use_8bit,
                     settings.hyper["percentile_clipping"], p.device, settings.correction)


def align_grad(p, name: str) -> bool:
    """Give DTensor ``p`` a gradient laid out like itself for the step; True if it was replaced (the
    caller puts the original back after the step, as torch's optimizers leave ``.grad`` alone).

    FSDP2's reduce-scatter gives that layout; a gradient that also went through DTensor ops outside
    the module's forward (a penalty computed on the sharded parameter) may come back with other
    placements (``Shard(1)`` for an uneven ``Shard(0)``, or ``Partial``), whose local values are not
    the parameter's local elements: redistributed here (a collective; placements are the same on
    every rank, so every rank takes it)."""
    g = p.grad
    if not is_dtensor(g):
        raise TypeError(f"parameter {name} is a DTensor but its gradient is a {type(g).__name__}; assign a DTensor "
                        "gradient with the parameter's mesh and placements")
    if g.device_mesh == p.device_mesh and tuple(g.placements) == tuple(p.placements):
        return False
    p.grad = g.redistribute(p.device_mesh, p.placements)
    return True


# ---- the ranks agree before a step -------------------------------------------------------------------
# Optimizer-wide settings every rank must share, in the order a difference is reported.
_OPTIMIZER_SETTINGS = ("class", "rule", "block_size", "block_wise", "quant_map", "on_nonfinite", "check_finite",
                       "amp_unscale")
_COLLECTIVE = ("under FSDP2 a dist8 step is collective (partial sums, shard-edge blocks, checkpoints), unlike "
               "torch's optimizers")


def agree_on_step(opt: Optimizer8bit, stepped: list[tuple[Any, ParamSettings]], every_step: bool = True,
                  error: Exception | None = None) -> None:
    """Refuse, on every rank and before any state is made or updated, a step whose ranks differ in the
    optimizer's settings or in the parameters they step (``stepped``: each parameter with a gradient
    and its settings, this step).

    torch's AdamW steps each rank's shard alone, so a rank that differs just steps differently; dist8's
    step runs collectives, which such a rank pairs up wrongly (a hang, a gloo mismatch, or state saved
    under another rank's settings). One all-reduce(MAX) of a hash of what must agree (and its
    complement) per step; what was hashed is gathered only when the hashes differ, to name the first
    difference. A parameter with a gradient on some ranks only is refused, not skipped: stepping it on
    the others would leave one parameter half updated. No-op without DTensor parameters (a sharded
    wrapper's sums: the wrapper keeps its ranks in step).

    ``every_step=False`` (``step_params``, gradient release's per-parameter updates inside backward, where
    FSDP2's reduce-scatter gives every rank the same parameters in the same order): agreed, hyperparameters
    included, the first time each structure (settings, names, the stepped parameters' kinds) is seen, not
    per call, so that backward is not held up by a collective per parameter; a change on one rank alone
    after that goes unseen there.

    ``error``: this rank's own checks refused the step (a bad value written into its groups only): raised
    here, and on the other ranks as a RuntimeError naming this rank, instead of leaving them in the
    collective (with ``every_step`` only: under gradient release the ranks do not meet here at every call)."""
    reduce_partials = opt.reduce_partials
    if not getattr(reduce_partials, "dist8_dtensor", False):
        return
    import torch.distributed as dist

    group = reduce_partials.group
    if dist.get_world_size(group) == 1:
        return
    wide, wide_hash = _optimizer_key(opt, reduce_partials)
    rows, hypers = _stepped_key(stepped)
    key = stable_hash((wide_hash, rows))  # O(stepped parameters): per call under gradient release
    # every_step=False: keyed without the hyperparameters (a scheduler's new lr every step would be a new key)
    if not every_step and key in reduce_partials.agreed_keys:
        return
    mine = -1 if error is not None else stable_hash((key, hypers))  # hypers: a scheduler changes lr every step
    both = torch.tensor([mine, ~mine], dtype=torch.int64, device=comm_device(group))
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)  # [max, -min]: equal to mine iff all are
    if both.tolist() == [mine, ~mine] and error is None:
        if not every_step:
            reduce_partials.agreed_keys.add(key)  # only once agreed: a refused key is checked again
        return
    everyone: list = [None] * dist.get_world_size(group)
    mine_described = ("refused", str(error)) if error is not None else ((*wide, rows), hypers)
    dist.all_gather_object(everyone, mine_described, group=group)
    if error is not None:
        raise error
    ranks = dist.get_process_group_ranks(group)
    refused = next((r for r, e in enumerate(everyone) if e[0] == "refused"), None)
    if refused is not None:
        raise RuntimeError(f"{type(opt).__name__}.step() failed on rank {ranks[refused]}: {everyone[refused][1]}")
    raise _first_difference(type(opt).__name__, everyone, ranks)


def _optimizer_key(opt: Optimizer8bit, reduce_partials: Any) -> tuple[tuple, int]:
    """((optimizer-wide settings, every parameter's name in order), its hash): rebuilt only when the settings
    or the param groups' lists change, not per call (under gradient release it is asked once per parameter:
    rebuilt each time, a step cost O(parameters^2))."""
    settings = (type(opt).__name__, str(opt.rule), opt.block_size, opt.block_wise, opt.quant_map, opt.on_nonfinite,
                opt.check_finite, opt.amp_unscale)
    groups = tuple((id(g), id(g["params"]), len(g["params"])) for g in opt.param_groups)
    cached = reduce_partials.wide
    if cached is None or cached[0] != (settings, groups):
        names = tuple(opt.param_name(p) for g in opt.param_groups for p in g["params"])
        cached = reduce_partials.wide = ((settings, groups), (settings, names),
                                         stable_hash((settings, names)))
    return cached[1], cached[2]


def _stepped_key(stepped: list) -> tuple[tuple, tuple]:
    """(per stepped parameter (name, 8-bit state, block size, master-weight correction, index of its
    hyperparameters), the distinct hyperparameter sets of the stepped parameters)."""
    index: dict[int, int] = {}  # id(hyper dict) -> its position in hypers: a group's parameters share one
    hypers = []
    rows = []
    for _, s in stepped:
        k = index.get(id(s.hyper))
        if k is None:
            k = index[id(s.hyper)] = len(hypers)
            hypers.append(tuple(sorted((key, comparable(v, read_device_tensors=False)) for key, v in s.hyper.items())))
        rows.append((s.name, s.use_8bit, s.block_size, str(s.correction), k))
    return tuple(rows), tuple(hypers)


def _first_difference(cls: str, everyone: list, ranks: list[int]) -> Exception:
    """The exception every rank raises: the first setting, parameter or gradient that differs in
    ``everyone`` (each rank's ((settings, names, rows), hyperparameters), in ``ranks`` order)."""

    def differs(label: str, values: list) -> ValueError | None:
        r = next((r for r, v in enumerate(values) if repr(v) != repr(values[0])), None)
        if r is None:
            return None
        return ValueError(f"{cls}: {label} is {values[0]!r} on rank {ranks[0]} but {values[r]!r} on rank {ranks[r]}; "
                          f"{_COLLECTIVE}: build the optimizer the same way on every rank; nothing was updated")

    for i, label in enumerate(_OPTIMIZER_SETTINGS):
        found = differs(label, [e[0][0][i] for e in everyone])
        if found:
            return found
    names = [e[0][1] for e in everyone]
    for r, theirs in enumerate(names):
        if theirs != names[0]:
            ours, their_set = set(names[0]), set(theirs)
            missing = [n for n in names[0] if n not in their_set]
            extra = [n for n in theirs if n not in ours]
            if missing:
                what = f"parameter {missing[0]} is in the optimizer on rank {ranks[0]} but not on rank {ranks[r]}"
            elif extra:
                what = f"parameter {extra[0]} is in the optimizer on rank {ranks[r]} but not on rank {ranks[0]}"
            else:
                what = f"the parameters are in another order on rank {ranks[r]} than on rank {ranks[0]}"
            return ValueError(f"{cls}: {what}; {_COLLECTIVE}: give it the same parameters on every rank; nothing "
                              "was updated")
    rows = [{row[0]: row for row in e[0][2]} for e in everyone]
    for name in names[0]:
        has = [name in r for r in rows]
        if any(has) and not all(has):
            return RuntimeError(
                f"parameter {name} has a gradient on rank {ranks[has.index(True)]} but none on rank "
                f"{ranks[has.index(False)]}; {_COLLECTIVE}: give it a gradient on every rank or set its .grad to "
                "None on every rank; nothing was updated"
            )
    for name in rows[0]:
        mine = [r[name] for r in rows]
        hypers = [dict(e[1][row[4]]) for e, row in zip(everyone, mine)]
        for key in sorted(set().union(*hypers)):
            found = differs(f"{key} of parameter {name}", [h.get(key, "unset") for h in hypers])
            if found:
                return found
        for label, i in ((f"the state of parameter {name}", 1), (f"the block size of parameter {name}", 2),
                         (f"the master-weight correction of parameter {name}", 3)):
            found = differs(label, [("8-bit" if row[1] else "32-bit") if i == 1 else row[i] for row in mine])
            if found:
                return found
    return ValueError(f"{cls}: the optimizer's settings differ between ranks; {_COLLECTIVE}; nothing was updated")


# ---- cross-shard sums and attaching -----------------------------------------------------------------
def _sum_over(group):
    def reduce_partials(values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = values.to(comm_device(group), copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out.to(values.device)

    reduce_partials.group = group  # agree_on_step's group
    reduce_partials.wide = None  # agree_on_step's cache of the optimizer-wide part and its hash
    reduce_partials.agreed_keys = set()  # agree_on_step(every_step=False)'s keys agreed so far
    return reduce_partials


def attach(opt: Optimizer8bit) -> bool:
    """Prepare ``opt`` for DTensor parameters; returns False (and does nothing) when it has none.

    All parameters must then be DTensors. When they are sharded over one process group (one
    FSDP2 model) or only replicated on a mesh that holds that group's ranks (tensor
    parallelism's replicated biases and norms), ``reduce_partials`` (non-finite flags,
    gradient norms for percentile clipping, LAMB/LARS norms) becomes an all-reduce(SUM)
    over the group, to which only the group's rank 0 adds a replicated parameter's partials
    (``partials_counted_elsewhere`` lists them on the other ranks). When some are sharded on
    several mesh dimensions (FSDP + TP) or over different groups, the sum runs over every rank
    and each distinct shard is added by the lowest rank that holds it (the shards' boxes are
    all-gathered once). The state-dict hook presents the state globally. Called again (by
    ``Optimizer8bit.follow_params``) when DTensors are swapped into ``param_groups`` after
    construction; attaching twice registers nothing twice.
    """
    params = [(opt.param_name(p), p) for g in opt.param_groups for p in g["params"]]
    dparams = [(name, p) for name, p in params if is_dtensor(p)]
    if not dparams:
        return False
    if opt.amp_unscale == "scaler":
        raise ValueError(
            f"amp_unscale='scaler' is not supported with DTensor (FSDP2) parameters such as {dparams[0][0]}: each "
            "rank's GradScaler would decide alone whether to call step(), and a rank that skips it leaves the "
            "others waiting in its collectives. Use the default amp_unscale='kernel' (one decision on every rank)"
        )
    plain = [name for name, p in params if not is_dtensor(p)]
    if plain:
        raise TypeError(
            f"parameters {plain[:3]} are plain tensors while {dparams[0][0]} is a DTensor (FSDP2); one dist8 "
            "optimizer needs all its parameters sharded the same way: apply fully_shard to the root module too, "
            "or give the plain parameters their own optimizer"
        )
    groups: dict[Any, str] = {}
    replicated = []
    several = []  # sharded on more than one mesh dimension (FSDP + TP)
    for name, p in dparams:
        dims = shard_dims(p, name)
        if not dims:
            replicated.append((name, p))
        elif one_plain_shard(p, dims):
            groups.setdefault(p.device_mesh.get_group(dims[0][0]), name)
        else:
            several.append((name, p))
    if several or len(groups) > 1:
        # FSDP + TP (2-D): the partials are summed over every rank, each distinct shard counted once
        import torch.distributed as dist

        group = world_group(several[0][1], several[0][0]) if several else dist.group.WORLD
        opt.partials_counted_elsewhere, opt.dtensor_boxes = _counted_elsewhere_2d(dparams)
    else:
        group = next(iter(groups), None)
        opt.partials_counted_elsewhere = _counted_elsewhere(group, replicated, next(iter(groups.values()), ""))
    made_here = getattr(opt.reduce_partials, "dist8_dtensor", False)  # a sharded wrapper's own stays
    if group is not None and (opt.reduce_partials is None or made_here):  # the group may have changed
        opt.reduce_partials = _sum_over(group)
        opt.reduce_partials.dist8_dtensor = True  # made here: detach() may take it back
    if opt.dtensor_hook is None:
        opt.dtensor_hook = opt.register_state_dict_post_hook(_state_dict_post_hook)
    return True


def _counted_elsewhere(group, replicated: list, sharded_name: str) -> frozenset[int]:
    """``id()`` of the replicated parameters whose partial sums another rank of ``group`` adds (all of
    them but on the group's rank 0); each must be replicated on every rank of ``group``."""
    if group is None or not replicated:
        return frozenset()
    import torch.distributed as dist

    ranks = set(dist.get_process_group_ranks(group))
    for name, p in replicated:
        if not ranks <= set(p.device_mesh.mesh.flatten().tolist()):
            raise NotImplementedError(
                f"parameter {name} is replicated on other ranks than those {sharded_name} is sharded over; one "
                "dist8 optimizer steps parameters of one mesh: give it a dist8 optimizer of its own"
            )
    return frozenset() if dist.get_rank(group) == 0 else frozenset(id(p) for _, p in replicated)


def _counted_elsewhere_2d(dparams: list) -> tuple[frozenset[int], dict[int, list]]:
    """``id()`` of the parameters whose local shard a lower rank also holds (it adds their partial sums
    to the sum over all ranks), and per parameter ``id()`` the box (global offset, local shape) of every
    rank's shard: all-gathered once."""
    import torch.distributed as dist

    boxes = [(name, *box_of(p, name)) for name, p in dparams]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, boxes)
    rank = dist.get_rank()
    elsewhere = set()
    for i, (name, p) in enumerate(dparams):
        if any(len(theirs) != len(boxes) or theirs[i][0] != name for theirs in everyone):
            raise NotImplementedError(
                f"parameter {name}: the ranks hold different parameter lists; a dist8 optimizer over parameters "
                "sharded on several mesh dimensions needs the same parameters, in the same order, on every rank"
            )
        if any(theirs[i] == boxes[i] for theirs in everyone[:rank]):
            elsewhere.add(id(p))
    return frozenset(elsewhere), {id(p): [theirs[i][1:] for theirs in everyone] for i, (_, p) in enumerate(dparams)}


def has_dtensor_params(opt: Optimizer8bit) -> bool:
    """Whether any parameter now in ``opt.param_groups`` is a DTensor."""
    return any(is_dtensor(p) for g in opt.param_groups for p in g["params"])


def detach(opt: Optimizer8bit) -> None:
    """Undo :func:`attach` (the parameters are plain tensors again)."""
    if opt.dtensor_hook is not None:
        opt.dtensor_hook.remove()
        opt.dtensor_hook = None
    if getattr(opt.reduce_partials, "dist8_dtensor", False):
        opt.reduce_partials = None
    opt.partials_counted_elsewhere = frozenset()
    opt.dtensor_boxes = {}


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
        lay = layout_for(opt, p, settings)
        st = dict(st)
        c = st.get(CORRECTION)  # elementwise like the parameter: sharded like it
        if isinstance(c, torch.Tensor) and not is_dtensor(c):
            st[CORRECTION] = DTensor.from_local(c, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                                stride=p.stride())
        for i in state_indices(opt.rule):
            s = st.get(state_key(i))
            if isinstance(s, torch.Tensor) and not is_dtensor(s):
                st[state_key(i)] = DTensor.from_local(s, p.device_mesh, p.placements, run_check=False,
                                                     shape=p.shape, stride=p.stride())
            a = st.get(absmax_key(i))
            if isinstance(a, torch.Tensor) and not lay.holds_every_block and lay.group is not None:
                st[absmax_key(i)] = lay.full_absmax(a)
                gathers.setdefault(lay.group, []).append((st, absmax_key(i)))
        new_state[key] = st
    for group, entries in gathers.items():
        if group is None:
            continue
        parts = [st[k] for st, k in entries]
        vec = torch.cat(parts).to(comm_device(group))
        dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=group)
        for (st, k), part in zip(entries, torch.split(vec, [t.numel() for t in parts])):
            st[k] = part.to(st[k].device)
    state_dict["state"] = new_state
    return state_dict


def localize_state(opt: Optimizer8bit, p, st: dict[str, Any]) -> dict[str, Any]:
    """Turn loaded state of global shape (DTensor or plain) into this rank's local state of ``p``
    (for a DTensor ``p``, new tensors: nothing returned shares memory with ``st``)."""
    name = opt.param_name(p)
    if not is_dtensor(p):
        return {k: full_tensor(v) for k, v in st.items()}
    settings = opt.settings(p, _group_of(opt, p))
    lay = layout_for(opt, p, settings)
    out = dict(st)
    for key, v in st.items():
        if not isinstance(v, torch.Tensor):
            continue
        if is_state_key(key) or key == CORRECTION:
            if is_dtensor(v):
                if v.device_mesh != p.device_mesh or tuple(v.placements) != tuple(p.placements):
                    v = v.redistribute(p.device_mesh, p.placements)
                v = v.to_local()
            else:
                v = lay.slice_global(v)
            if tuple(v.shape) != lay.local_shape:
                raise ValueError(f"{key} of parameter {name}: local shard {tuple(v.shape)}, expected {lay.local_shape}")
            out[key] = v.to(p.device).contiguous().clone()
        elif is_absmax_key(key):
            v = full_tensor(v)
            if v.numel() != lay.nblocks:
                raise ValueError(
                    f"{key} of parameter {name} has {v.numel()} entries; the parameter ({lay.numel} elements in "
                    f"blocks of {lay.block}) has {lay.nblocks} blocks (saved with another block_size?)"
                )
            out[key] = lay.local_absmax(v).to(p.device, torch.float32).clone()
        elif is_dtensor(v):
            out[key] = full_tensor(v)
        else:  # the percentile-clipping history, identical on every shard
            out[key] = v.clone()
    return out
