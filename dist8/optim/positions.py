"""What sits at each position of an optimizer's ``param_groups``, to notice parameters swapped in.

Code that applies FSDP2 after the optimizer was built (accelerate's ``prepare``, HF Trainer
on FSDP2) replaces the tensors in ``param_groups`` with DTensors.
:meth:`dist8.optim.base.Optimizer8bit.follow_params` uses this record to give each new
parameter the name and module marks of the one it replaced and to find that one's state.

Parameters are recorded by ``id()``, not referenced: a replaced parameter may be freed
(accelerate frees them to save memory), and a weak reference would make
``torch.utils.swap_tensors`` refuse the parameter (``Module.to`` / ``to_empty`` swap FSDP2's
DTensors, and every parameter under ``torch.__future__.set_swap_module_params_on_conversion``).
A swap keeps the parameter object but exchanges its attributes, module marks included: for a
marked parameter the record holds its attribute dict, and a parameter whose dict was exchanged
without some of the marks' keys gets them back.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from dist8.optim.config import OVERRIDE_ATTR
from dist8.optim.manager import missing_marks

__all__ = ["Replacement", "ParamPositions"]


class Replacement(NamedTuple):
    """A parameter found where another one was (or the same one, swapped, without its marks): the old
    one (None if freed, unknown, or the same object), its name and marks."""

    param: torch.Tensor
    old: torch.Tensor | None
    name: str | None
    marks: dict[str, Any] | None


class _Entry(NamedTuple):
    pid: int  # id() of the parameter recorded at this position
    name: str | None
    marks: dict[str, Any] | None  # its module marks when recorded
    attrs: dict | None  # its attribute dict, for a marked parameter (swap_tensors exchanges it)


class ParamPositions:
    """(id, name, module marks) of the parameter at every (group, index) position."""

    def __init__(self, param_groups: list[dict], names: Mapping[torch.Tensor, str]) -> None:
        self.groups = [self._entries(g["params"], names) for g in param_groups]

    @staticmethod
    def _entries(params: list[torch.Tensor], names: Mapping[torch.Tensor, str]) -> list[_Entry]:
        out = []
        for p in params:
            marks = getattr(p, OVERRIDE_ATTR, None)
            out.append(_Entry(id(p), names.get(p), marks, p.__dict__ if marks is not None else None))
        return out

    @staticmethod
    def _lost_marks(entry: _Entry, p: torch.Tensor) -> bool:
        """The recorded object, whose attribute dict a swap exchanged for one lacking some of the marks'
        keys (a mark removed by hand, e.g. GlobalOptimManager.initialize(), leaves the dict and is
        respected). Lacking keys, not lacking a mark: ``dist8.nn.Embedding`` marks its swapped weight
        again at once with its own setting, and a manager override beside it would be lost."""
        return entry.attrs is not None and p.__dict__ is not entry.attrs and bool(missing_marks(p, entry.marks))

    def add_group(self, params: list[torch.Tensor], names: Mapping[torch.Tensor, str]) -> None:
        self.groups.append(self._entries(params, names))

    def pop_group(self) -> None:
        self.groups.pop()

    def changed(self, param_groups: list[dict]) -> bool:
        """Whether any position now holds another tensor (or groups were added or resized), or a
        parameter lost its marks to a swap."""
        if len(self.groups) != len(param_groups):
            return True
        for entries, group in zip(self.groups, param_groups):
            params = group["params"]
            if len(entries) != len(params):
                return True
            for entry, p in zip(entries, params):
                if id(p) != entry.pid or self._lost_marks(entry, p):
                    return True
        return False

    def replacements(self, param_groups: list[dict], alive: Mapping[int, torch.Tensor]) -> list[Replacement]:
        """Every parameter now at a position that held another one, and every swapped one without its
        marks. ``alive``: the tensors the optimizer still references (its state's and names' keys) by
        ``id()``, where a replaced parameter that has state is found; marks are the old parameter's
        current ones if it is found, else those it had when recorded.

        A parameter that only moved is no replacement: the one recorded at its position is still in
        ``param_groups`` (a reorder, an insertion before it), or it is itself one the optimizer holds
        (``alive``: removing a parameter shifts the ones after it). Taken for replacements, they took
        the state of their neighbours, silently (torch keys state by parameter, wherever it sits)."""
        current = {id(q) for group in param_groups for q in group["params"]}
        out = []
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                if gi >= len(self.groups) or pi >= len(self.groups[gi]):
                    continue
                entry = self.groups[gi][pi]
                if id(p) == entry.pid:
                    if self._lost_marks(entry, p):
                        out.append(Replacement(p, None, entry.name, entry.marks))
                    continue
                if entry.pid in current or alive.get(id(p)) is p:
                    continue
                old, marks = alive.get(entry.pid), entry.marks
                if old is not None and getattr(old, OVERRIDE_ATTR, None) is not None:
                    marks = getattr(old, OVERRIDE_ATTR)
                out.append(Replacement(p, old, entry.name, marks))
        return out
