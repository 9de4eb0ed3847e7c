"""What :class:`dist8.shard.ShardedOptimizer` checks while it is built, before any buffer exists.

Each check raises one line naming the parameter (or argument) and leaves nothing built. The layout
check is collective and also carries what one rank found wrong with its own tensors, and each rank's
optimizer settings (:func:`optimizer_settings`), so that every rank refuses together (see
:mod:`dist8.shard.agreement`).
"""
from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from dist8.messages import brief
from dist8.optim.base import Optimizer8bit
from dist8.optim.comparable import comparable, same
from dist8.optim.config import OVERRIDABLE_KEYS, OVERRIDE_ATTR, hyperparameters_of, match_overrides
from dist8.optim.manager import restore_module_marks
from dist8.optim.paged import PAGED, paged_message
from dist8.shard.agreement import from_every_rank
from dist8.shard.layout import BlockLayout

__all__ = ["check_optimizer_class", "check_tensors", "master_weight_bits_of", "check_no_master_weight_override",
           "optimizer_settings", "first_settings_difference", "check_same_layout_on_all_ranks"]


def check_optimizer_class(given: Any) -> None:
    """Refuse, in one line, a ``optimizer_class`` that is not a dist8 optimizer class."""
    if isinstance(given, type) and issubclass(given, Optimizer8bit):
        return
    if any(given is paged for paged in PAGED.values()):  # bitsandbytes' paged names: why, as calling one says
        raise ValueError(paged_message(f"dist8.{given.__name__}", f"dist8.{given.__name__[len('Paged'):]}"))
    if isinstance(given, Optimizer8bit):  # an instance (its repr spans many lines)
        raise TypeError(f"optimizer_class must be a dist8 optimizer class, got an instance of {type(given).__name__}: "
                        f"pass the class and its arguments, ShardedOptimizer(params, dist8.{type(given).__name__}, "
                        "lr=...)")
    raise TypeError(f"optimizer_class must be a dist8 optimizer class, got {brief(given)}")


def check_tensors(params: Sequence[torch.Tensor], names: Sequence[str]) -> None:
    """This rank's parameters can be laid out: materialised, on one device, not already sharded."""
    meta = [n for p, n in zip(params, names) if p.is_meta]
    if meta:  # it would copy nothing into its flat buffers and fail at the first step on Tensor.item()
        raise ValueError(f"parameter {meta[0]} is on the meta device: materialise the model (to_empty() and "
                         "initialise or load its weights) before building ShardedOptimizer, whose flat "
                         "buffers take the parameters' values")
    first = params[0]
    for name, p in zip(names, params):
        if p.device != first.device:
            raise ValueError(f"parameter {name} is on {p.device} but {names[0]} is on {first.device}; "
                             "ShardedOptimizer needs all parameters on one device")
        if getattr(p, "_is_flat_param", False) or type(p).__name__ == "DTensor":
            raise TypeError(f"parameter {name} is already sharded ({type(p).__name__}); use the dist8 optimizer "
                            "directly with FSDP2 instead of ShardedOptimizer")


def master_weight_bits_of(groups: list[dict[str, Any]], defaults: dict[str, Any]) -> int | None:
    """The groups' ``master_weight_bits`` (None: no correction); one value for all groups, or an error."""
    values = {g.get("master_weight_bits", defaults.get("master_weight_bits")) for g in groups}
    if len(values) > 1:
        raise ValueError(f"ShardedOptimizer needs one master_weight_bits for all parameter groups, got "
                         f"{sorted(values, key=str)}; a rank's range mixes the groups' parameters")
    return values.pop()


def check_no_master_weight_override(params: Sequence[torch.Tensor], names: Sequence[str],
                                    overrides: dict[str, dict[str, Any]], bits: int | None) -> None:
    """A parameter's own ``master_weight_bits`` (name override or module mark) must be the groups' ``bits``:
    the fp32 master copy or the correction is chosen per flat buffer, not per parameter."""
    for name, p in zip(names, params):
        own = match_overrides(name, p, overrides).get("master_weight_bits", bits)
        if own != bits:
            raise ValueError(f"ShardedOptimizer needs one master_weight_bits for all parameters, but parameter "
                             f"{name} has {own} from overrides or a module mark (the groups': {bits}); set it "
                             "for the whole optimizer")


_NOT_GIVEN = object()  # a setting one rank has and another lacks (an argument only one rank passed)


def _constructor_defaults(optimizer_class: type[Optimizer8bit]) -> dict[str, Any]:
    """The keyword arguments ``optimizer_class`` takes, with their defaults: its ``__init__``'s and those of
    the dist8 classes it passes ``**kwargs`` on to (the first class's default wins, as that one applies)."""
    found: dict[str, Any] = {}
    for klass in optimizer_class.__mro__:
        init = vars(klass).get("__init__")
        if init is None or not issubclass(klass, Optimizer8bit):
            continue
        for name, arg in inspect.signature(init).parameters.items():
            if arg.default is not arg.empty and arg.kind in (arg.POSITIONAL_OR_KEYWORD, arg.KEYWORD_ONLY):
                found.setdefault(name, arg.default)
    return found


def optimizer_settings(optimizer_class: type[Optimizer8bit], groups: Sequence[Mapping[str, Any]],
                       defaults: Mapping[str, Any], params: Sequence[torch.Tensor],
                       wrapper_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """This rank's settings that decide how its blocks train and what kind of state they keep, as plain data
    for :func:`check_same_layout_on_all_ranks` to compare across ranks (a rank reading its own config file
    trained its blocks with its own lr, quant_map, ...: one model as a patchwork of settings).

    They are: the optimizer class and its rule; ``wrapper_args`` (ShardedOptimizer's own arguments:
    stage, ...); the constructor arguments ``defaults``, with the class's defaults for those not given; each
    param group's own hyperparameters (``groups``: the split param groups); the param group of each of
    ``params`` (the layout's parameters, in its order) and each one's override marks (set by modules or
    ``GlobalOptimManager``: with equal arguments, what decides a parameter's 8-bit or 32-bit state and
    ``master_weight_bits`` then is its size and dtype, which the layout check compares)."""
    restore_module_marks()  # as the inner optimizer does when built: the marks are read below
    constructor = _constructor_defaults(optimizer_class)
    constructor.update(defaults)
    if constructor.get("optim_bits") is None:  # the dist8 classes' None: the class's default_bits
        constructor["optim_bits"] = getattr(optimizer_class, "default_bits", None)
    group_of = {id(p): gi for gi, group in enumerate(groups) for p in group["params"]}
    return {
        "optimizer_class": comparable(optimizer_class),
        "rule": comparable(getattr(optimizer_class, "rule", None)),
        "wrapper": {k: comparable(v) for k, v in (wrapper_args or {}).items()},
        "constructor": {k: comparable(v) for k, v in constructor.items()},
        "groups": [{k: comparable(v) for k, v in hyperparameters_of(g).items()} for g in groups],
        "group_of": [group_of.get(id(p)) for p in params],
        "marks": [comparable(getattr(p, OVERRIDE_ATTR, None) or {}) for p in params],
    }


def _keys(*mappings: Mapping[str, Any]) -> list[str]:
    """The keys of ``mappings``, each once, in the order first met."""
    return list(dict.fromkeys(k for m in mappings for k in m))


def _settings_pairs(a: dict[str, Any], b: dict[str, Any], names: Sequence[str]) -> Iterator[tuple[str, Any, Any]]:
    """(what, value in ``a``, value in ``b``) for every setting of two :func:`optimizer_settings`, in the order
    differences are named: class, wrapper arguments, param groups, constructor arguments, marks."""
    yield "optimizer_class", a["optimizer_class"], b["optimizer_class"]
    yield "the optimizer's update rule", a["rule"], b["rule"]
    for key in _keys(a["wrapper"], b["wrapper"]):
        yield key, a["wrapper"].get(key, _NOT_GIVEN), b["wrapper"].get(key, _NOT_GIVEN)
    yield "the number of param groups", len(a["groups"]), len(b["groups"])
    if len(a["groups"]) != len(b["groups"]):
        return
    for name, ga, gb in zip(names, a["group_of"], b["group_of"]):
        yield f"the param group of parameter {name}", ga, gb
    in_groups = set(_keys(*a["groups"], *b["groups"]))
    for key in _keys(a["constructor"], b["constructor"], *a["groups"], *b["groups"]):
        own_a, own_b = a["constructor"].get(key, _NOT_GIVEN), b["constructor"].get(key, _NOT_GIVEN)
        if key not in OVERRIDABLE_KEYS and key not in in_groups:  # a constructor argument only
            yield key, own_a, own_b
            continue
        for gi, (group_a, group_b) in enumerate(zip(a["groups"], b["groups"])):
            yield f"param group {gi} {key}", group_a.get(key, own_a), group_b.get(key, own_b)
    for name, ma, mb in zip(names, a["marks"], b["marks"]):
        yield f"parameter {name}'s override mark", ma, mb


def first_settings_difference(a: dict[str, Any], b: dict[str, Any],
                              names: Sequence[str]) -> tuple[str, Any, Any] | None:
    """The first setting in which two ranks' :func:`optimizer_settings` differ (their layouts, ``names``,
    being equal): (what, its value in ``a``, in ``b``), or None when they agree."""
    return next(((what, x, y) for what, x, y in _settings_pairs(a, b, names) if not same(x, y)), None)


def _shown(value: Any) -> str:
    return "not given" if value is _NOT_GIVEN else repr(value)


def _check_same_settings(everyone: Sequence[dict[str, Any] | None], names: Sequence[str]) -> None:
    """Refuse, on every rank alike (each compares the same gathered list), settings that differ from rank 0's."""
    if any(settings is None for settings in everyone):  # a caller that gathers none
        return
    for r, theirs in enumerate(everyone[1:], start=1):
        difference = first_settings_difference(everyone[0], theirs, names)
        if difference is not None:
            what, a, b = difference
            raise ValueError(f"ShardedOptimizer settings differ between ranks: {what} is {_shown(a)} on rank 0 "
                             f"and {_shown(b)} on rank {r}; every rank must build the optimizer with the same "
                             "settings")


def check_same_layout_on_all_ranks(layout: BlockLayout, params: Sequence[torch.Tensor], names: Sequence[str],
                                   group: dist.ProcessGroup | None, world_size: int,
                                   local_problem: Exception | None,
                                   settings: dict[str, Any] | None = None) -> None:
    """Collective: every rank lays out the same parameters (names, shapes, dtypes, block size) with the same
    ``settings`` (:func:`optimizer_settings`; None: not compared), and ``local_problem`` (a rank's refusal
    of its own tensors, :func:`check_tensors`) is raised on every rank, the others naming the rank.
    One gather, at construction only: nothing is compared per step."""
    if world_size == 1:
        if local_problem is not None:
            raise local_problem
        return
    dtypes = [str(p.dtype).replace("torch.", "") for p in params]
    mine = (layout.fingerprint(), dtypes, None if local_problem is None else str(local_problem), settings)
    everyone = from_every_rank(mine, group)
    if local_problem is not None:
        raise local_problem
    for r, (_, _, problem, _) in enumerate(everyone):
        if problem is not None:
            raise ValueError(f"ShardedOptimizer was refused on rank {r}: {problem}")
    if all(fp == mine[0] for fp, _, _, _ in everyone):
        for r, (_, theirs, _, _) in enumerate(everyone):
            for name, a, b in zip(names, everyone[0][1], theirs):
                if a != b:  # flat buffers per dtype: their sizes and the broadcast would not match
                    raise ValueError(f"parameters differ across ranks: parameter {name} is {a} on rank 0 "
                                     f"but {b} on rank {r}; cast the model the same way on every rank")
        _check_same_settings([theirs for _, _, _, theirs in everyone], names)
        return
    lists = from_every_rank([(p.name, p.shape) for p in layout.params], group)
    for r, other in enumerate(lists):
        for i, (a, b) in enumerate(zip(lists[0], other)):
            if a != b:
                raise ValueError(f"parameters differ across ranks: parameter {i} is {a[0]} {a[1]} on rank 0 "
                                 f"but {b[0]} {b[1]} on rank {r}")
        if len(other) != len(lists[0]):
            raise ValueError(f"rank {r} has {len(other)} parameters, rank 0 has {len(lists[0])}")
    raise ValueError("parameter layout (block size) differs across ranks")
