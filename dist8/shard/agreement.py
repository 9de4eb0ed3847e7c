"""One verdict for all ranks: an error found on some ranks is raised on every rank.

A check that reads what only this rank sees (its disk, its tensors) and raises before a collective
leaves the other ranks waiting in that collective forever. Callers run such checks first, keep the
error, and hand it here at the point where every rank meets anyway.
"""
from __future__ import annotations

import torch.distributed as dist

__all__ = ["raise_on_every_rank"]


def raise_on_every_rank(error: BaseException | None, group: dist.ProcessGroup | None, what: str,
                        error_type: type[Exception] = RuntimeError) -> None:
    """Raise ``error`` where it happened and, on every other rank of ``group``, ``error_type("{what}
    failed on rank R: ...")`` naming the first rank that failed; return on every rank when none did.

    Collective (one ``all_gather_object`` of the message) when torch.distributed is initialised and
    ``group`` has several ranks; otherwise ``error`` is raised if given.
    """
    message = None if error is None else str(error)
    failed: list[tuple[int, str]] = []
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        everyone: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, message, group=group)
        failed = [(r, m) for r, m in enumerate(everyone) if m is not None]
    if error is not None:
        raise error
    if failed:
        rank, msg = failed[0]
        raise error_type(f"{what} failed on rank {rank}: {msg}")
