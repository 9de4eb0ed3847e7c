"""Accounting of non-finite skips: which parameters lost how many blocks (or whole steps).

Modes (``on_nonfinite`` of every dist8 optimizer):

- ``"skip"`` (default): no separate check. The kernels already read every gradient; a block
  whose new state or output would be non-finite (an inf/NaN gradient, or an overflow such as
  a gradient above ~1.8e19 squared) keeps its state and parameter and is counted here, one per
  block. The counts stay on the device until read (no host sync in the step).
- ``"skip_param"``: the earlier contract: one read of every gradient before the update, and a
  parameter with any inf/NaN is skipped whole (counted once per parameter and step).
- ``"raise"``: that read, and ``FloatingPointError`` naming the parameter.
"""
from __future__ import annotations

import torch

from dist8.messages import brief

__all__ = ["NONFINITE_MODES", "SkipCounter", "check_mode"]

NONFINITE_MODES = ("skip", "skip_param", "raise")
# Device count tensors kept before they are read back anyway (bounds memory on CUDA).
_MAX_PENDING = 256


def check_mode(mode: str) -> str:
    """Validate an ``on_nonfinite`` value."""
    if not isinstance(mode, str) or mode not in NONFINITE_MODES:
        raise ValueError(f"on_nonfinite must be one of {NONFINITE_MODES}, got {brief(mode)}")
    return mode


class SkipCounter:
    """Skipped blocks (kernel) and skipped parameters (pre-pass), in total and per parameter name.

    In a sharded run each rank counts what its own kernels skipped (a block shared by two
    ranks' shards is counted by the rank that holds its first element; replicas count once, and
    a parameter skipped whole is counted by one rank: see ``dtensor_layout.counts_skips`` and
    ``pipeline.counts_whole_skip``): the sum over ranks equals the count of the unsharded run.
    """

    def __init__(self) -> None:
        self._total = 0
        self._by_name: dict[str, int] = {}
        self._last: list[str] = []
        self._pending: list[tuple[list[str], torch.Tensor]] = []

    def new_step(self) -> None:
        """Start a step: :attr:`last` lists the parameters skipped from here on."""
        self._fold()
        self._last = []

    def add_param(self, name: str) -> None:
        """A whole parameter skipped by the pre-pass (``skip_param`` / ``raise``)."""
        self._add(name, 1)

    def add_blocks(self, names: list[str], counts: torch.Tensor) -> None:
        """``counts[i]`` (int64, any device) blocks of ``names[i]`` skipped by a kernel; read lazily."""
        self._pending.append((names, counts))
        if len(self._pending) > _MAX_PENDING:
            self._fold()

    @property
    def total(self) -> int:
        self._fold()
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        self._fold()
        self._total = int(value)

    @property
    def last(self) -> list[str]:
        self._fold()
        return list(self._last)

    def by_name(self) -> dict[str, int]:
        self._fold()
        return dict(self._by_name)

    def _add(self, name: str, count: int) -> None:
        self._total += count
        self._by_name[name] = self._by_name.get(name, 0) + count
        if name not in self._last:
            self._last.append(name)

    def _fold(self) -> None:
        pending, self._pending = self._pending, []
        for names, counts in pending:
            for name, count in zip(names, counts.tolist()):
                if count:
                    self._add(name, int(count))
