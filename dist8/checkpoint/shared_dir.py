"""Whether a checkpoint's temporary directory is the same directory on every rank (storage every node shares).

Checkpoints whose ranks each write their own files -- a ``ShardedOptimizer``'s blocks, the train job's
``torch`` and ``dcp`` writers -- put them into a temporary directory rank 0 creates. On node-local disks (or
with a path per rank) a rank that finds no such directory fails with its writer's "No such file or directory"
naming a random file, and one that finds a directory of that name (a leftover, or one DCP's writer creates
for itself) writes there while rank 0 finishes a checkpoint without its files, silently: the resume fails
days later. :func:`check_every_rank_sees` refuses that before any rank writes.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import torch.distributed as dist

from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.files import read_text
from dist8.shard.agreement import from_every_rank, raise_on_every_rank

__all__ = ["SHARED_MARK", "check_every_rank_sees"]

# Written by rank 0 into the temporary directory, read back by every rank; the writer removes it before the
# directory is renamed into place (a checkpoint holds only the files its metadata lists).
SHARED_MARK = ".dist8-every-rank-sees"


def check_every_rank_sees(tmp: Path, final: Path, group: dist.ProcessGroup | None = None, what: str = "save") -> None:
    """Collective over ``group`` (the world by default) once rank 0 has created ``tmp``: rank 0 writes a random
    mark into it and every rank reads it back; a rank that cannot is refused on every rank with one
    :class:`CheckpointError` line naming it, ``final`` and, when the ranks were given different paths, both
    (on the other ranks prefixed ``"{what} failed on rank R: "``, as :func:`raise_on_every_rank` does).

    Nothing to do without torch.distributed or with one rank. The mark stays in ``tmp`` for the caller's
    rank 0 to remove (under its own error handling) before it renames ``tmp`` into place.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    rank = dist.get_rank(group)
    token = secrets.token_hex(16) if rank == 0 else None
    error: CheckpointError | None = None
    if token is not None:
        try:
            (tmp / SHARED_MARK).write_text(token)
        except OSError as exc:
            error = CheckpointError(f"writing {tmp / SHARED_MARK} failed: {exc.strerror or exc}")
    raise_on_every_rank(error, group, what, CheckpointError)
    here = str(final.absolute())
    token, rank_0_path = from_every_rank((token, here), group)[0]
    try:
        seen = read_text(tmp / SHARED_MARK)
    except (OSError, CheckpointError):
        seen = None
    if seen != token:
        paths = "" if rank_0_path == here else f" (rank 0 saves to {rank_0_path}, this rank to {here})"
        error = CheckpointError(f"{final}: rank {rank} does not see the directory rank 0 is writing the checkpoint "
                                f"into{paths}; a checkpoint needs one path that every rank sees, on storage every "
                                "node shares (not node-local disks)")
    raise_on_every_rank(error, group, what, CheckpointError)
