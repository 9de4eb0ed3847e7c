"""Sums over a whole parameter that DeepSpeed's ZeRO split across ranks' flat partitions.

LAMB/LARS trust ratios, percentile clipping's gradient norm and ``on_nonfinite="skip_param"``/
``"raise"`` decide per parameter from sums over all its elements. Under ZeRO each rank steps only
its own part of a split parameter, so the step pipeline's per-parameter partial sums
(:func:`dist8.optim.pipeline.run_updates`) are given one *slot* per parameter name, the same on
every rank, and summed over DeepSpeed's data-parallel group in one all-reduce per step -- the
mechanism :class:`dist8.ShardedOptimizer` uses for its pieces.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from dist8.kernels import RULE_WRITES_UPDATE
from dist8.optim.base import Optimizer8bit
from dist8.shard.agreement import from_every_rank

__all__ = ["PartitionSums", "needs_whole_parameter_sums", "clips"]

NO_CLIPPING = 100


def clips(settings: dict[str, Any]) -> bool:
    """Whether ``settings`` (a param group, an override or a module mark) turn percentile clipping on."""
    return settings.get("percentile_clipping", NO_CLIPPING) < NO_CLIPPING


def needs_whole_parameter_sums(opt: Optimizer8bit, marks_clip: bool) -> bool:
    """Whether a step of ``opt`` reads sums over whole parameters, decided from what every rank sees
    alike (the rule, ``on_nonfinite``, the groups' and overrides' ``percentile_clipping``, and
    ``marks_clip``: whether a module mark of any model parameter turns clipping on), so that every rank
    joins the all-reduce or none does."""
    return (opt.rule in RULE_WRITES_UPDATE or opt.on_nonfinite in ("skip_param", "raise") or marks_clip
            or any(clips(g) for g in opt.param_groups) or any(clips(o) for o in opt.overrides.values()))


class PartitionSums:
    """Global slots for the per-parameter partial sums of a dist8 optimizer under ZeRO.

    Args:
        names: every model parameter's name, in ``named_parameters()`` order (the same on every rank);
            slot ``i`` is ``names[i]``'s, summed over the ranks that hold its parts.
        private: this rank's items that no name stands for on every rank (a flat partition holding only
            padding; a segment of a parameter the model does not name), by any hashable key: each gets a
            slot only this rank adds to.
        n_private: the most private items of any rank (every rank's private slots are a range this long).
        group: DeepSpeed's data-parallel process group (None: the default group).
        device: where the all-reduce's buffer goes (the engine's device: NCCL reduces CUDA tensors only).
        marks_clip: whether a ``GlobalOptimManager`` mark of any model parameter turns percentile clipping
            on (see :func:`needs_whole_parameter_sums`); ``DeepSpeedSegments.follow_marks`` sets it again
            when a mark changes (after the first step: it applies at the next, on every rank).
        any_split: whether ZeRO split some parameter across ranks, agreed by every rank (without a split
            parameter every rank's sums are already whole: no all-reduce).
    """

    def __init__(self, names: list[str], private: list, n_private: int, group: dist.ProcessGroup | None,
                 device: torch.device, marks_clip: bool, any_split: bool) -> None:
        several = dist.is_available() and dist.is_initialized()
        self.group = group
        self.device = device
        self.rank = dist.get_rank(group) if several else 0
        self.world = dist.get_world_size(group) if several else 1
        self.slot_of_name = {n: i for i, n in enumerate(names)}
        first = len(names) + self.rank * n_private
        self.private_slot = {key: first + k for k, key in enumerate(private)}
        self.n_slots = len(names) + n_private * self.world
        self.slot_names = list(names) + [f"(an item of rank {r})" for r in range(self.world) for _ in range(n_private)]
        for key, slot in self.private_slot.items():
            self.slot_names[slot] = str(key)
        self.marks_clip = marks_clip
        self.any_split = any_split

    @classmethod
    def agreed(cls, names: list[str], private: list, group: dist.ProcessGroup | None, device: torch.device,
               marks_clip: bool, split_here: bool) -> PartitionSums:
        """Built with every rank's private count and ``split_here`` (whether this rank holds part of a
        parameter; collective). Raises ValueError on every rank when the ranks' parameter names differ."""
        seen = from_every_rank((names, len(private), split_here), group)
        if any(other != names for other, _, _ in seen):
            raise ValueError("the ranks' models differ (their parameter names): build the same model on every rank")
        return cls(names, private, max(n for _, n, _ in seen), group, device, marks_clip,
                   any(s for _, _, s in seen))

    def slot(self, name: str, key: Any) -> int:
        """The slot of the item for parameter ``name`` (``key`` when the model does not name it)."""
        found = self.slot_of_name.get(name)
        return self.private_slot[key] if found is None else found

    def active(self, opt: Optimizer8bit) -> bool:
        """Whether this step sums across ranks (the same answer on every rank)."""
        return self.any_split and self.world > 1 and needs_whole_parameter_sums(opt, self.marks_clip)

    def all_reduce(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the data-parallel group (collective), back on the CPU."""
        values = values.to(self.device)
        dist.all_reduce(values, group=self.group)
        return values.cpu()
