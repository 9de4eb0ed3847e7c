"""The on-disk format: a directory with ``metadata.json`` and safetensors files (no pickle).

::

    CKPT/
      metadata.json                        format, versions, layout, optimizer, steps, files + sha256
      model.safetensors                    model state (written by rank 0; parameters are replicated)
      optim-00000-of-00004.safetensors     one per saving rank: "<param>::state1", "::absmax1", ...

Every optimizer tensor in a rank file is the rank's *piece* of a parameter, a
range of whole blocks; ``metadata.json`` says which range, so any world size
can re-slice the global sequence of blocks.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = ["FORMAT", "FORMAT_VERSION", "CheckpointError", "rank_file", "MODEL_FILE", "METADATA", "sha256_file",
           "read_metadata", "verify_files", "tensor_key", "file_entry", "temp_dir", "install_dir", "write_json_atomic"]

FORMAT = "dist8.checkpoint"
FORMAT_VERSION = 1
METADATA = "metadata.json"
MODEL_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not fit the model/optimizer; the message names the file or key."""


def rank_file(rank: int, world_size: int) -> str:
    return f"optim-{rank:05d}-of-{world_size:05d}.safetensors"


def tensor_key(param_name: str, key: str) -> str:
    return f"{param_name}::{key}"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """The ``files`` entry of ``metadata.json`` for one written file: sha256 and size."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def temp_dir(final: Path) -> Path:
    """A fresh temporary directory beside ``final`` (a leftover from a crashed write is removed)."""
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
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


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and check ``metadata.json`` of the checkpoint directory ``path``."""
    path = Path(path)
    meta_path = path / METADATA
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not meta_path.is_file():
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete dist8 checkpoint")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta['version']} is newer than this dist8 reads "
                              f"({FORMAT_VERSION}); upgrade dist8")
    for key in ("block_size", "params", "files", "pieces", "world_size"):
        if key not in meta:
            raise CheckpointError(f"{meta_path} has no {key!r} entry")
    return meta


def verify_files(path: str | os.PathLike, meta: dict[str, Any], names: list[str] | None = None,
                 checksums: bool = True) -> None:
    """Check existence, size and (optionally) sha256 of the checkpoint's files; raise naming the first bad one."""
    path = Path(path)
    for name, info in meta["files"].items():
        if names is not None and name not in names:
            continue
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing")
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{file} has {size} bytes, metadata says {info['size']} (truncated or replaced)")
        if checksums and sha256_file(file) != info["sha256"]:
            raise CheckpointError(f"{file} fails its sha256 check (corrupt)")


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
