"""What sits at each position of an optimizer's ``param_groups``, to notice parameters swapped in.

Code that applies FSDP2 after the optimizer was built (accelerate's ``prepare``, HF Trainer
on FSDP2) replaces the tensors in ``param_groups`` with DTensors.
:meth:`dist8.optim.base.Optimizer8bit.follow_params` uses this record to give each new
parameter the name and module marks of the one it replaced and to find that one's state.
Parameters are held by weak reference: a replaced parameter may be freed (accelerate frees
them to save memory).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from dist8.optim.config import OVERRIDE_ATTR

__all__ = ["Replacement", "ParamPositions"]


class Replacement(NamedTuple):
    """A parameter found where another one was: the old one (None if freed), its name and marks."""

    param: torch.Tensor
    old: torch.Tensor | None
    name: str | None
    marks: dict[str, Any] | None


class ParamPositions:
    """(weak reference, name, module marks) of the parameter at every (group, index) position."""

    def __init__(self, param_groups: list[dict], names: Mapping[torch.Tensor, str]) -> None:
        self.groups = [self._entries(g["params"], names) for g in param_groups]

    @staticmethod
    def _entries(params: list[torch.Tensor], names: Mapping[torch.Tensor, str]) -> list[tuple]:
        return [(weakref.ref(p), names.get(p), getattr(p, OVERRIDE_ATTR, None)) for p in params]

    def add_group(self, params: list[torch.Tensor], names: Mapping[torch.Tensor, str]) -> None:
        self.groups.append(self._entries(params, names))

    def pop_group(self) -> None:
        self.groups.pop()

    def changed(self, param_groups: list[dict]) -> bool:
        """Whether any position now holds another tensor (or groups were added or resized)."""
        if len(self.groups) != len(param_groups):
            return True
        for entries, group in zip(self.groups, param_groups):
            params = group["params"]
            if len(entries) != len(params):
                return True
            for entry, p in zip(entries, params):
                if entry[0]() is not p:
                    return True
        return False

    def replacements(self, param_groups: list[dict]) -> list[Replacement]:
        """Every parameter now at a position that held another one; marks are the old parameter's
        current ones if it is still alive, else those it had when recorded."""
        out = []
        for gi, group in enumerate(param_groups):
            for pi, p in enumerate(group["params"]):
                if gi >= len(self.groups) or pi >= len(self.groups[gi]):
                    continue
                ref, name, marks = self.groups[gi][pi]
                old = ref()
                if old is p:
                    continue
                if old is not None and getattr(old, OVERRIDE_ATTR, None) is not None:
                    marks = getattr(old, OVERRIDE_ATTR)
                out.append(Replacement(p, old, name, marks))
        return out
