"""The two state-dict formats of :class:`dist8.shard.ShardedOptimizer`, written and read here.

* **Shard** (``format: "dist8.sharded/1"``): this rank's pieces, the layout fingerprint, rank
  and world size, and the optimizer's ``steps_taken`` (absent from files before 2026-12-04); loads only
  on the same rank of the same world size (:mod:`dist8.checkpoint` reshards files), and only with the
  other ranks' shards of the same save (steps and param-group values compared across ranks).
* **Unsharded**: the whole state in the unsharded dist8 optimizer's own format (parameter index
  -> codes with the parameter's shape, full absmax, ...), as ``full_state_dict=True`` and
  ``consolidated_state_dict`` give it; loads at any world size, every rank slicing the whole
  blocks of its pieces (exact), after every tensor's length is checked against its parameter.

Only the optimizer's public attributes are used (``params``, ``names``, ``pieces``, ``layout``,
``inner``, ``check_shard_state``, ``install_shard_state``, ...).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import TYPE_CHECKING, Any

import torch

from dist8.messages import brief
from dist8.optim.config import load_group_values
from dist8.optim.state_schema import (CORRECTION, GNORM, STATE_DICT_INFO, check_state_dict_info, check_state_dict_rule,
                                      check_state_dict_layout, check_state_dict_map, flat_length,
                                      is_absmax_key, is_state_key, state_dict_info)
from dist8.shard.agreement import failures_on_every_rank, from_every_rank
from dist8.shard.collectives import piece_range, wait_for_every_rank

if TYPE_CHECKING:
    from dist8.shard.sharded import ShardedOptimizer

__all__ = ["OwnedState", "shard_format", "unsharded_format", "load"]

SHARD_FORMAT = "dist8.sharded/1"

# param groups' values after a load, and the warnings it gives (see _groups_after_load)
_Groups = tuple[list[dict[str, Any]], list[str]]


class OwnedState(dict):
    """``ShardedOptimizer.state``: parameter -> the state of this rank's piece of it (a read-only view;
    ``state[p]`` of a parameter without a piece here is ``{}``),
    true as soon as the optimizer has state on any rank (stepped or loaded: the same on every rank),
    even on a rank that owns no piece. torch.distributed.checkpoint steps an optimizer whose ``state``
    is false once with zero gradients to create its state; on a trained one that step was a real one."""

    def __init__(self, items: Any, has_state: bool) -> None:
        super().__init__(items)
        self.has_state = has_state

    def __bool__(self) -> bool:
        return self.has_state

    def __missing__(self, param: Any) -> dict:
        """No state here for ``param`` (another rank owns it, or it has none): an empty dict, as torch's
        ``defaultdict`` state answers, not inserted. DCP's ``flatten_optimizer_state_dict`` loader reads
        ``optim.state[p]`` for every parameter to know which entries to take (a KeyError before)."""
        return {}


def _sliced(key: str, value: Any) -> bool:
    """Whether a full state-dict entry is laid out on the parameter's elements or blocks (a piece takes
    its part of it) rather than shared by every piece (``step``)."""
    return torch.is_tensor(value) and (is_state_key(key) or is_absmax_key(key) or key in (CORRECTION, GNORM))


def _unsharded_indices(opt: ShardedOptimizer) -> dict[torch.Tensor, int]:
    """Parameter -> its index in the unsharded optimizer's state dict (param_groups order)."""
    index_of: dict[torch.Tensor, int] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            index_of.setdefault(p, len(index_of))
    return index_of


def shard_format(opt: ShardedOptimizer) -> dict[str, Any]:
    """This rank's shard: per-parameter piece state plus the layout it belongs to."""
    return {
        "format": SHARD_FORMAT,
        "rank": opt.rank,
        "world_size": opt.world_size,
        "layout": opt.layout.describe(),
        "fingerprint": opt.layout.fingerprint(),
        "pieces": [[p.param, p.start, p.stop] for p in opt.pieces],
        "state": opt.shard_state(),
        "steps": opt.steps_taken,
        "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        STATE_DICT_INFO: state_dict_info(opt.inner.quant_map, opt.inner.rule),
    }


def unsharded_format(opt: ShardedOptimizer, full: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Gathered per-layout-index state as the unsharded dist8 optimizer's state dict."""
    index_of = _unsharded_indices(opt)
    state = {}
    for i, st in full.items():
        p = opt.params[i]
        state[index_of[p]] = {
            k: (v.view(p.shape) if is_state_key(k) or k == CORRECTION else v) for k, v in st.items()
        }
    groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[index_of[p] for p in g["params"]])
              for g in opt.param_groups]
    return {"state": state, "param_groups": groups,
            STATE_DICT_INFO: state_dict_info(opt.inner.quant_map, opt.inner.rule)}


def load(opt: ShardedOptimizer, state_dict: dict[str, Any]) -> None:
    """Load either format into ``opt`` (the unsharded one is told by its missing ``format`` key).

    Everything is checked, on every rank, before anything is installed: a refusal leaves the state and
    param groups as they were, on every rank (each rank checks only its own shard, or the blocks it owns
    of a full dict, so on several ranks the verdicts are shared: a collective, where every rank loads)."""
    if opt.world_size > 1:  # a client loading on one rank only is told so, instead of waiting without a word
        wait_for_every_rank(opt.group, opt.device, "ShardedOptimizer.load_state_dict()",
                            "Load the state dict on every rank: each rank takes its own blocks of it.")
    agreed = (failures_on_every_rank(opt.group, "ShardedOptimizer.load_state_dict", ValueError)
              if opt.world_size > 1 else contextlib.nullcontext())
    shard = False
    with agreed:
        if not isinstance(state_dict, dict):
            raise ValueError("state_dict must be a dict (from ShardedOptimizer.state_dict()), got "
                             f"{type(state_dict).__name__}")
        if "format" not in state_dict and "state" in state_dict and "param_groups" in state_dict:
            state, (groups, warned) = _check_unsharded(opt, state_dict)
        else:
            state, (groups, warned) = _check_shard(opt, state_dict)
            shard = True
    if opt.world_size > 1:
        _refuse_mixed_saves(opt, state_dict, shard)
    opt.install_shard_state(state)
    if shard and "steps" in state_dict:
        opt.steps_taken = state_dict["steps"]
    for group, values in zip(opt.param_groups, groups):
        group.update(values)
    for message in warned:  # 5: the caller of ShardedOptimizer.load_state_dict (through the hooks' frame)
        warnings.warn(message, UserWarning, stacklevel=5)


def _refuse_mixed_saves(opt: ShardedOptimizer, state_dict: dict[str, Any], shard: bool) -> None:
    """Refuse, on every rank, state dicts that are not one save's: a shard on one rank and a full dict on
    another, shards saved after different numbers of steps, or different param-group values (a rank's
    file left from another save loaded silently, each rank then stepping its blocks from another point
    or with another lr). Collective; every rank compares the same gathered values, so every rank gives
    the same verdict."""
    groups = [{k: _comparable(v) for k, v in g.items() if k not in ("params", "param_names")}
              for g in state_dict["param_groups"]]
    seen = from_every_rank((shard, state_dict.get("steps"), groups), opt.group)
    fix = "load the state dicts of one save on every rank (nothing was loaded)"
    kinds = [k for k, _, _ in seen]
    if len(set(kinds)) > 1:
        said = ", ".join(f"rank {r} a {'shard' if k else 'full'} one" for r, k in enumerate(kinds))
        raise ValueError(f"ShardedOptimizer.load_state_dict: the ranks were given different formats ({said}): {fix}")
    steps = [s for _, s, _ in seen]
    if len(set(steps)) > 1:
        said = ", ".join(f"rank {r}'s after {'unrecorded' if s is None else s}" for r, s in enumerate(steps))
        raise ValueError(f"ShardedOptimizer.load_state_dict: the ranks' shard state dicts were saved after different "
                         f"numbers of steps ({said}): {fix}")
    first = seen[0][2]
    for r, (_, _, other) in enumerate(seen[1:], 1):
        for gi, (mine, theirs) in enumerate(zip(first, other)):
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    raise ValueError(f"ShardedOptimizer.load_state_dict: param group {gi}'s {key} is "
                                     f"{mine.get(key, 'missing')} in rank 0's state dict and "
                                     f"{theirs.get(key, 'missing')} in rank {r}'s: {fix}")


def _comparable(value: Any) -> str:
    """A param-group value as the ranks compare it: a tensor by its values (an ``lr`` tensor lives on each
    rank's own GPU), anything else by ``repr``."""
    if isinstance(value, torch.Tensor):
        return f"tensor({value.detach().cpu().tolist()!r})"
    return repr(value)


def _groups_after_load(opt: ShardedOptimizer, saved_groups: list[dict[str, Any]]) -> _Groups:
    """Each param group as the load leaves it (``load_group_values`` on a copy: installed with the state)
    and the warnings to give once it is loaded (given here, a warning raised as an error stopped it half done)."""
    after, warned = [], []
    for group, saved in zip(opt.param_groups, saved_groups):
        values = dict(group)
        warned.append(load_group_values(values, saved, warn=False))
        after.append(values)
    return after, [w for w in dict.fromkeys(warned) if w]


def _check_unsharded(opt: ShardedOptimizer, state_dict: dict[str, Any]) -> tuple[dict[int, dict], _Groups]:
    """The unsharded format: every rank slices the blocks of its pieces (whole blocks: exact). Returns the
    checked state of this rank's pieces and the param groups' values, nothing installed."""
    check_state_dict_layout(state_dict)
    check_state_dict_map(state_dict, opt.inner.quant_map, opt.inner.rule)
    saved_groups, state = state_dict["param_groups"], state_dict["state"]  # their shapes checked just above
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, optimizer has {len(opt.param_groups)}")
    key_of: dict[torch.Tensor, Any] = {}  # parameter -> its key in the dict, by position as torch matches them
    for gi, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):  # before anything is loaded
        opt.inner.check_loaded_group(saved, gi)
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {gi} of state_dict lists {len(saved['params'])} parameters, "
                             f"the optimizer's has {len(group['params'])}")
        key_of.update(zip(group["params"], saved["params"]))  # ids, or names (torch.distributed.checkpoint's)
    _refuse_unknown_ids(state, set(key_of.values()))
    by_slot = {}
    B = opt.layout.block_size
    for i, p in enumerate(opt.params):
        st = state.get(key_of[p])
        if st is None:
            continue
        if not isinstance(st, dict):
            raise ValueError(f"state of parameter {opt.names[i]} must be a dict, got {type(st).__name__}")
        for key, v in st.items():
            if _sliced(key, v) and v.numel() != flat_length(key, p.numel(), B):
                raise ValueError(f"{key} of parameter {opt.names[i]} has {v.numel()} entries, expected "
                                 f"{flat_length(key, p.numel(), B)} (another parameter, shape or block_size?)")
        by_slot[i] = st
    received: dict[int, dict[str, Any]] = {}
    for piece in opt.pieces:
        st = by_slot.get(piece.param)
        if st is None:
            continue
        received[piece.param] = {
            k: v.reshape(-1)[slice(*piece_range(k, piece.start, piece.stop, B))] if _sliced(k, v) else v
            for k, v in st.items()}
    checked = opt.check_shard_state(received)  # copies: the slices are views of the caller's dict
    return checked, _groups_after_load(opt, saved_groups)


def _refuse_unknown_ids(state: dict, known: set[int]) -> None:
    """State for a parameter id this optimizer (or this rank's shard) does not hold means the dict
    belongs to other parameters: refused, as the unsharded optimizer refuses it, before loading."""
    unknown = [k for k in state if k not in known]
    if unknown:
        raise ValueError(f"state_dict has state for parameter id {unknown[0]!r}, which this optimizer's "
                         f"shard does not hold (ids it holds: {sorted(known)[:8]}{'...' if len(known) > 8 else ''})")


# The entries of the shard format (shard_format) and the types load reads them as.
_SHARD_ENTRIES = {"rank": (int, "an int"), "world_size": (int, "an int"), "fingerprint": (str, "a string"),
                  "state": (dict, "a dict"), "param_groups": (list, "a list")}


def _check_shard_entries(state_dict: dict[str, Any]) -> None:
    """One line naming the entry a shard dict lacks or holds as another type (a bare KeyError, or a message
    reading 'rank 0 of 1's shard; this is rank 0 of 1' for a world_size of "1", before)."""
    for key, (kind, what) in _SHARD_ENTRIES.items():
        value = state_dict.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"ShardedOptimizer shard state_dict entry {key!r} must be {what}, got "
                             f"{brief(value) if key in state_dict else 'nothing (missing)'}")
    for gi, group in enumerate(state_dict["param_groups"]):
        if not isinstance(group, dict):
            raise ValueError(f"ShardedOptimizer shard state_dict param_groups[{gi}] must be a dict, got {brief(group)}")
    check_state_dict_info(state_dict)


def _check_shard(opt: ShardedOptimizer, state_dict: dict[str, Any]) -> tuple[dict[int, dict], _Groups]:
    """The shard format (this rank's, same world size): its checked state and the param groups' values."""
    if state_dict.get("format") != SHARD_FORMAT:
        raise ValueError(f"not a ShardedOptimizer state_dict (missing format {SHARD_FORMAT!r})")
    _check_shard_entries(state_dict)
    check_state_dict_rule(state_dict, opt.inner.rule)
    steps = state_dict.get("steps", 0)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"ShardedOptimizer shard state_dict entry 'steps' must be an int >= 0, got {brief(steps)}")
    if state_dict["fingerprint"] != opt.layout.fingerprint():
        raise ValueError("state_dict was saved for different parameters (layout fingerprint differs)")
    if state_dict["world_size"] != opt.world_size or state_dict["rank"] != opt.rank:
        raise ValueError(
            f"state_dict is rank {state_dict['rank']} of {state_dict['world_size']}'s shard; this is rank "
            f"{opt.rank} of {opt.world_size}. A client that saves rank 0's state dict only needs "
            "ShardedOptimizer(full_state_dict=True); dist8.checkpoint loads at another world size")
    check_state_dict_map(state_dict, opt.inner.quant_map, opt.inner.rule)
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(saved_groups)} param groups, optimizer has {len(opt.param_groups)}")
    for gi, saved in enumerate(saved_groups):  # before anything is loaded
        opt.inner.check_loaded_group(saved, gi)
    _refuse_unknown_ids(state_dict["state"], {piece.param for piece in opt.pieces})
    checked = opt.check_shard_state(state_dict["state"])
    return checked, _groups_after_load(opt, saved_groups)
