"""One training job per directory: rank 0 holds an exclusive lock on ``output.dir`` and ``checkpoint.dir``.

Two jobs writing one directory corrupted each other with misleading errors (a save failing on a file
the other job had renamed away, "rank 1 does not see the directory rank 0 is writing"), and lost
metrics: a second ``dist8 train`` into the same directories, or a ``--resume auto`` started while the
ranks of a killed launcher were still saving (found by an outside probe). The lock is ``flock`` on
``.dist8-train.lock`` in the directory, so the operating system drops it when the job ends however it
ends (a SIGKILL leaves no stale lock); the file names the pid holding it, for the message.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from dist8.train.config import ConfigError

__all__ = ["LOCK_NAME", "directory_lock"]

LOCK_NAME = ".dist8-train.lock"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, key: str) -> Iterator[None]:
    """Hold the lock of ``directory`` (created if missing) while inside; ConfigError naming config key ``key``
    and the pid holding it when another job does."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as exc:
        raise ConfigError(f"config key {key}: cannot lock {str(directory)!r}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(f"config key {key}: {str(directory)!r} is in use by another dist8 train job (pid "
                              f"{holder}); wait for it to end, or give this run another directory") from None
        except OSError as exc:  # a file system without locks: go on as before, unlocked
            if exc.errno not in (getattr(os, "ENOLCK", -1), getattr(os, "EOPNOTSUPP", -1)):
                raise ConfigError(f"config key {key}: cannot lock {str(directory)!r}: {exc.strerror or exc}") \
                    from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
