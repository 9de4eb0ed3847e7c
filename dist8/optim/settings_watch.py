"""Whether the settings the optimizer state depends on changed since the last look.

A parameter's state is made for its settings at its first step: ``optim_bits``/``min_8bit_size`` decide
8-bit codes or fp32 and ``percentile_clipping`` a gradient-norm history (``config.KEYS_STATE_DEPENDS_ON``).
Changed later -- by ``GlobalOptimManager.override_config`` (a new mark on the parameter) or in a param
group -- the state may not follow, and ``Optimizer8bit.check_state_fits`` refuses it. Where that check
must run on every rank alike before any collective (``ShardedOptimizer``, DeepSpeed's segments) or before
backward starts stepping (gradient release), :class:`SettingsWatch` says when to run it: it compares the
parameters' marks by identity (a mark is replaced, never edited) and the groups' values, which every rank
sees alike, so every rank answers alike.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from dist8.optim.config import KEYS_STATE_DEPENDS_ON, OVERRIDE_ATTR

__all__ = ["SettingsWatch"]


class SettingsWatch:
    """Remembers the marks of some parameters and their groups' :data:`KEYS_STATE_DEPENDS_ON` values.

    ``changed(params, groups)`` is True at the first look, after :meth:`forget`, and when a mark or a
    value differs from the last :meth:`accept`-ed look; call :meth:`accept` once the check passed (a
    refused change is then checked again at the next look)."""

    def __init__(self) -> None:
        self._seen: tuple[list[Any], list[tuple]] | None = None
        self._looked: tuple[list[Any], list[tuple]] | None = None

    def changed(self, params: Iterable[torch.Tensor], groups: Iterable[dict[str, Any]]) -> bool:
        """Whether ``params``' marks or ``groups``' values changed since the last accepted look."""
        marks = [getattr(p, OVERRIDE_ATTR, None) for p in params]
        values = [tuple(g.get(k) for k in KEYS_STATE_DEPENDS_ON) for g in groups]
        self._looked = (marks, values)
        seen = self._seen
        return (seen is None or seen[1] != values or len(seen[0]) != len(marks)
                or any(a is not b for a, b in zip(seen[0], marks)))

    def accept(self) -> None:
        """The last look's settings passed the check."""
        self._seen = self._looked

    def forget(self) -> None:
        """The state was replaced (a load): the next look reports a change."""
        self._seen = None

    def marks(self) -> list[Any]:
        """The marks of the last look (in ``params`` order)."""
        return list(self._looked[0]) if self._looked is not None else []
