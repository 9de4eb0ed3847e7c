"""What :class:`dist8.shard.ShardedOptimizer` checks while it is built, before any buffer exists.

Each check raises one line naming the parameter (or argument) and leaves nothing built. The layout
check is collective and also carries what one rank found wrong with its own tensors, so that every
rank refuses together (see :mod:`dist8.shard.agreement`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from dist8.messages import brief
from dist8.optim.base import Optimizer8bit
from dist8.optim.config import match_overrides
from dist8.optim.paged import PAGED, paged_message
from dist8.shard.agreement import from_every_rank
from dist8.shard.layout import BlockLayout

__all__ = ["check_optimizer_class", "check_tensors", "master_weight_bits_of", "check_no_master_weight_override",
           "check_same_layout_on_all_ranks"]


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


def check_same_layout_on_all_ranks(layout: BlockLayout, params: Sequence[torch.Tensor], names: Sequence[str],
                                   group: dist.ProcessGroup | None, world_size: int,
                                   local_problem: Exception | None) -> None:
    """Collective: every rank lays out the same parameters (names, shapes, dtypes, block size), and
    ``local_problem`` (a rank's refusal of its own tensors, :func:`check_tensors`) is raised on every
    rank, the others naming the rank."""
    if world_size == 1:
        if local_problem is not None:
            raise local_problem
        return
    dtypes = [str(p.dtype).replace("torch.", "") for p in params]
    mine = (layout.fingerprint(), dtypes, None if local_problem is None else str(local_problem))
    everyone = from_every_rank(mine, group)
    if local_problem is not None:
        raise local_problem
    for r, (_, _, problem) in enumerate(everyone):
        if problem is not None:
            raise ValueError(f"ShardedOptimizer was refused on rank {r}: {problem}")
    if all(fp == mine[0] for fp, _, _ in everyone):
        for r, (_, theirs, _) in enumerate(everyone):
            for name, a, b in zip(names, everyone[0][1], theirs):
                if a != b:  # flat buffers per dtype: their sizes and the broadcast would not match
                    raise ValueError(f"parameters differ across ranks: parameter {name} is {a} on rank 0 "
                                     f"but {b} on rank {r}; cast the model the same way on every rank")
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
