"""One verdict for all ranks: what some rank found is known to, or raised on, every rank.

A check that reads what only this rank sees (its disk, its tensors) and raises, or branches, before a
collective leaves the other ranks waiting in that collective forever, or going on with another
answer. Callers run such checks first and share the outcome here, where every rank meets anyway.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dist8.optim.comparable import stable_hash

__all__ = ["from_every_rank", "raise_on_every_rank", "failures_on_every_rank", "rank_0_answer", "agree_every_step"]

T = TypeVar("T")


def _several_ranks(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def from_every_rank(value: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order: ``[value]`` without several ranks in ``group``,
    else one ``all_gather_object`` (collective)."""
    if not _several_ranks(group):
        return [value]
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, value, group=group)
    return everyone


def raise_on_every_rank(error: BaseException | None, group: dist.ProcessGroup | None, what: str,
                        error_type: type[Exception] = RuntimeError) -> None:
    """Raise ``error`` where it happened and, on every other rank of ``group``, ``error_type("{what}
    failed on rank R: ...")`` naming the first rank that failed; return on every rank when none did.

    Collective (:func:`from_every_rank` of the message) when torch.distributed is initialised and
    ``group`` has several ranks; otherwise ``error`` is raised if given.
    """
    messages = from_every_rank(None if error is None else str(error), group)
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        rank, msg = failed[0]
        raise error_type(f"{what} failed on rank {rank}: {msg}")


@contextlib.contextmanager
def failures_on_every_rank(group: dist.ProcessGroup | None, what: str,
                           error_type: type[Exception] = RuntimeError) -> Iterator[None]:
    """Run the ``with`` block, then :func:`raise_on_every_rank` whatever it raised (any ``Exception``):
    for checks of what one rank alone sees, made before a collective. Collective on leaving the block."""
    error: Exception | None = None
    try:
        yield
    except Exception as exc:  # noqa: BLE001 -- shared below, then raised where it happened
        error = exc
    raise_on_every_rank(error, group, what, error_type)


def rank_0_answer(question: Callable[[], T], group: dist.ProcessGroup | None = None,
                  error_type: type[Exception] = RuntimeError) -> T:
    """``question()`` asked on the group's first rank only and its answer returned on every rank (one
    ``broadcast_object_list``; without several ranks, simply ``question()``). An ``error_type`` it
    raises is raised on every rank, with its message; any other exception is raised on the first rank
    as it is and, on the others, as ``error_type("... on rank 0: TYPE: message")`` (never left for the
    others to wait on)."""
    if not _several_ranks(group):
        return question()
    answer: list = [None, None]  # the answer, or the refusal's message
    failure: Exception | None = None
    if dist.get_rank(group) == 0:
        try:
            answer[0] = question()
        except error_type as exc:
            answer[1] = str(exc)
        except Exception as exc:  # noqa: BLE001 -- shared, then raised below
            failure = exc
            answer[1] = f"the question asked on rank 0 failed there: {type(exc).__name__}: {exc}"
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(answer, src=src, group=group)
    if failure is not None:
        raise failure
    if answer[1] is not None:
        raise error_type(answer[1])
    return answer[0]


def agree_every_step(rows: list[tuple[str, Any]], error: BaseException | None, group: dist.ProcessGroup | None,
                     device: torch.device, what: str) -> None:
    """Return on every rank when every rank has the same ``rows`` (``(label, plain value)`` pairs, e.g.
    :func:`dist8.optim.comparable.comparable` settings) and no ``error``; else raise on every rank: ``error``
    where it happened and ``RuntimeError("{what} failed on rank R: ...")`` on the others, or, where only
    the rows differ, ``ValueError`` naming the first label whose value differs and two ranks' values.

    Cheap enough for every step: one all-reduce(MAX) of a 63-bit hash of the rows and its complement
    (equal to this rank's on every rank iff all hashes are equal); the rows are gathered only when they
    differ. Collective when ``group`` has several ranks; otherwise ``error`` is raised if given."""
    if not _several_ranks(group):
        if error is not None:
            raise error
        return
    mine = -1 if error is not None else stable_hash(rows)
    both = torch.tensor([mine, ~mine], dtype=torch.int64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if error is None and both.tolist() == [mine, ~mine]:
        return
    everyone = from_every_rank(("refused", str(error)) if error is not None else ("rows", rows), group)
    if error is not None:
        raise error
    refused = next((r for r, (kind, _v) in enumerate(everyone) if kind == "refused"), None)
    if refused is not None:
        raise RuntimeError(f"{what} failed on rank {refused}: {everyone[refused][1]}")
    tables = [dict(v) for _kind, v in everyone]
    for label in dict.fromkeys(label for table in tables for label in table):
        values = [repr(table.get(label, "(not set)")) for table in tables]
        other = next((r for r, v in enumerate(values) if v != values[0]), None)
        if other is not None:
            raise ValueError(f"{what}: {label} is {values[0]} on rank 0 but {values[other]} on rank {other}; every "
                             "rank steps the blocks it owns with its own settings, so a change (a scheduler's, an "
                             "edit of param_groups, an override) must be made on every rank alike; nothing was "
                             "updated")
    raise RuntimeError(f"{what}: the ranks' settings hash differently but compare equal")  # a hash collision
