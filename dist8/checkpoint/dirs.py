"""Atomic writes of checkpoint directories and files: temporary name, fsync, rename into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from dist8.checkpoint.errors import CheckpointError

__all__ = ["check_output_dir", "check_replaceable", "install_dir", "temp_dir", "write_json_atomic"]


def check_output_dir(out: Path, force: bool, reading: Path | None = None) -> None:
    """Refuse to replace a non-empty ``out`` (a user's directory) unless ``force``, and, whatever
    ``force``, an ``out`` that is the directory ``reading`` (the checkpoint being converted), holds
    it (replacing ``out`` would delete the source) or lies inside it."""
    if reading is not None:
        o, r = out.resolve(), Path(reading).resolve()
        if o == r:
            raise CheckpointError(f"{out}: writing the output onto the checkpoint being read; choose another "
                                  "output directory")
        if o in r.parents:
            raise CheckpointError(f"{out} holds the checkpoint being read ({reading}); replacing it would delete "
                                  "the source: choose another output directory")
        if r in o.parents:
            raise CheckpointError(f"{out} lies inside the checkpoint being read ({reading}); choose an output "
                                  "directory outside it")
    if (out.is_symlink() or out.exists()) and not force and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty; pass --force (force=True) to replace it")


def check_replaceable(final: Path, metadata_name: str) -> None:
    """``final`` may be replaced by a new checkpoint: absent, an empty directory, or a checkpoint (it
    holds ``metadata_name``). Anything else is a user's file or directory, which saving there would
    delete: refused naming it."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise CheckpointError(f"{final} exists and is not a checkpoint directory; choose another path")
    if final.is_dir() and any(final.iterdir()) and not (final / metadata_name).is_file():
        raise CheckpointError(f"{final} exists, is not empty and is not a checkpoint (no {metadata_name}); "
                              "saving there would replace it: choose a new directory")


def temp_dir(final: Path) -> Path:
    """A fresh temporary directory beside ``final`` (a leftover from a crashed write is removed)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists() or tmp.is_symlink():
        shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    tmp.mkdir(parents=True)
    return tmp


def install_dir(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` into place; an existing ``final`` is kept aside until the new one is there."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


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
