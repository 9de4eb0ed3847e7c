"""Atomic writes of checkpoint directories and files: temporary name, fsync, rename into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dist8.checkpoint.errors import CheckpointError

__all__ = ["aside_names", "check_output_dir", "check_replaceable", "install_dir", "temp_dir", "write_json_atomic"]

# Longest file name (bytes) of the common file systems (ext4, xfs, btrfs, APFS, tmpfs): the output's
# temporary name ``.NAME.tmp`` must fit, or the write fails after the whole input was read.
NAME_MAX = 255


def aside_names(final: Path) -> tuple[Path, Path]:
    """The two names a write of ``final`` uses beside it, and removes: the temporary directory the new
    one is written into, and the name the replaced one is kept under until the new one is in place."""
    return final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")


def check_output_dir(out: Path, force: bool, reading: Path | None = None) -> None:
    """Refuse, before anything is read or written, an output directory ``out`` a converter cannot
    write or must not replace; one :class:`CheckpointError` line naming it.

    Refused whatever ``force``: an ``out`` that is the directory ``reading`` (the checkpoint being
    converted), holds it or lies inside it; a ``reading`` at one of ``out``'s :func:`aside_names`
    (the write removes those names: the source would be deleted); a name that is not one
    (``.``, ``..``, ``/``) or too long for its temporary name; an ``out`` that exists but is not a
    directory (a file or a symlink: ``force`` replaces a directory only); an ``out`` whose parent
    cannot hold a directory. Refused unless ``force``: a non-empty directory (a user's).
    """
    _check_out_name(out)
    if reading is not None:
        _check_not_reading(out, Path(reading))
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise CheckpointError(f"{out} exists and is not a directory (a file or a symlink); the output must be a "
                              "new or existing directory (--force replaces a directory only): choose another path")
    if out.is_dir() and not force and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty; pass --force (force=True) to replace it")
    _check_creatable(out)


def _check_out_name(out: Path) -> None:
    if out.name in ("", ".", ".."):  # Path(".").name is "": no directory of its own to write and rename
        raise CheckpointError(f"output directory {str(out)!r} does not name a directory of its own; give a "
                              "path ending in the new directory's name (e.g. ./consolidated)")
    size = len(os.fsencode(aside_names(out)[0].name))
    if size > NAME_MAX:
        raise CheckpointError(f"output directory {str(out)[:80]}... has a name too long to write: its temporary "
                              f"name .NAME.tmp would be {size} bytes, more than the {NAME_MAX} a file name may have")


def _real(path: Path) -> Path:
    """``path`` with symlinks resolved; a symlink loop stays as it is (``Path.resolve`` raised RuntimeError)."""
    return Path(os.path.realpath(path))


def _check_not_reading(out: Path, reading: Path) -> None:
    o, r = _real(out), _real(reading)
    if o == r:
        raise CheckpointError(f"{out}: writing the output onto the checkpoint being read; choose another "
                              "output directory")
    if o in r.parents:
        raise CheckpointError(f"{out} holds the checkpoint being read ({reading}); replacing it would delete "
                              "the source: choose another output directory")
    if r in o.parents:
        raise CheckpointError(f"{out} lies inside the checkpoint being read ({reading}); choose an output "
                              "directory outside it")
    # The aside names are removed without following a symlink at them (_remove), so they are compared as
    # the write uses them (out's resolved parent plus the name) with the source resolved and as given
    # (a symlink at an aside name to the source: removing the link made the source unreadable mid-write).
    sources = {r, Path(os.path.abspath(reading))}
    for aside, what in zip(aside_names(out), ("temporary", "kept-aside")):
        at = _real(out.parent) / aside.name
        if any(s == at or at in s.parents for s in sources):
            raise CheckpointError(f"{reading} is at {aside.name}, the {what} name writing {out} uses and removes; "
                                  "move the checkpoint elsewhere first or choose another output directory")


def _check_creatable(out: Path) -> None:
    """The nearest existing ancestor of ``out`` must be a directory (``temp_dir`` creates the rest)."""
    parent = out.absolute().parent
    while not os.path.lexists(parent) and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"output directory {out} cannot be created: {parent} is not a directory")


def check_replaceable(final: Path, metadata_name: str) -> None:
    """``final`` may be replaced by a new checkpoint: absent, an empty directory, or a checkpoint (it
    holds ``metadata_name``). Anything else is a user's file or directory, which saving there would
    delete: refused naming it."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"{final} exists and is not a checkpoint directory; choose another path")
    if final.is_dir() and any(final.iterdir()) and not (final / metadata_name).is_file():
        raise CheckpointError(f"{final} exists, is not empty and is not a checkpoint (no {metadata_name}); "
                              "saving there would replace it: choose a new directory")


def _remove(path: Path) -> None:
    """Remove ``path`` (directory tree, file or symlink; a symlink itself, never what it points to)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def temp_dir(final: Path) -> Path:
    """A fresh temporary directory beside ``final`` (a leftover from a crashed write is removed).

    An OS error (a parent that is a file, a read-only or virtual file system, ...) is a
    :class:`CheckpointError` naming ``final``: nothing has been written then.
    """
    tmp = aside_names(final)[0]
    try:
        _remove(tmp)
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write {final}: creating {tmp} failed: {exc.strerror or exc}") from exc
    return tmp


def install_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` into place; an existing ``final`` is kept aside until the new one is there
    (put back if the new one cannot be renamed). OS errors are a :class:`CheckpointError` naming ``final``."""
    if not os.path.lexists(final):
        _rename(tmp, final, final)
        return
    old = aside_names(final)[1]
    try:
        _remove(old)  # a leftover: ``final`` exists, so it is not the only copy of anything
    except OSError as exc:
        raise CheckpointError(f"cannot write {final}: removing the leftover {old} failed: {exc.strerror}") from exc
    _rename(final, old, final)
    try:
        _rename(tmp, final, final)
    except CheckpointError:
        _rename(old, final, final)  # the replaced directory back in place: the command failed, nothing is lost
        raise
    try:
        _remove(old)
    except OSError as exc:  # the new one is in place; say where the old one was left rather than pretend
        raise CheckpointError(f"wrote {final}, but the directory it replaced is left at {old} (removing it "
                              f"failed: {exc.strerror})") from exc


def _rename(src: Path, dst: Path, final: Path) -> None:
    try:
        os.replace(src, dst)
    except OSError as exc:
        raise CheckpointError(f"writing {final} failed: renaming {src.name} to {dst.name}: {exc.strerror or exc}") \
            from exc


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"writing {path} failed: {exc.strerror or exc}") from exc
