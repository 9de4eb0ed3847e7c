"""Safe access to the files of a checkpoint directory.

Names come from ``metadata.json`` (or a ``latest`` pointer), which a hostile or
corrupt checkpoint controls: a name must be one plain file name inside the
directory, the file a regular file (a symlink, FIFO or device is refused from its
``lstat``, without opening it), and a safetensors header is size-checked before
anything is allocated for it.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from dist8.checkpoint.errors import CheckpointError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_JSON_BYTES",
    "parse_json",
    "check_name",
    "member",
    "open_regular",
    "read_text",
    "safetensors_header",
    "sha256_file",
]

# safetensors itself refuses headers above 100 MB; metadata.json of a million-parameter model is ~200 MB.
MAX_HEADER_BYTES = 100_000_000
MAX_JSON_BYTES = 1 << 28  # metadata.json: ~320 bytes per parameter, so room for ~800k parameter tensors
# Parsed, every JSON list or object costs ~60 bytes of Python objects: a file of nothing but "[]," took 49x its
# size in memory (50 MiB -> 2.7 GB). dist8's metadata holds one per ~60 bytes and safetensors headers one per ~25.
BYTES_PER_JSON_CONTAINER = 8


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)``, refusing first (one line naming ``where``) a text of more lists and objects than
    one per :data:`BYTES_PER_JSON_CONTAINER` characters, which no file dist8 reads has and whose parse would
    take dozens of times its size in memory."""
    containers = text.count("[") + text.count("{")
    if containers > len(text) // BYTES_PER_JSON_CONTAINER + 4096:
        raise CheckpointError(f"{where} holds {containers} JSON lists and objects in {len(text)} characters, "
                              "far more than a checkpoint's (not parsed: it would take dozens of times its size "
                              "in memory)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON: {str(exc)[:100]}") from None


def check_name(name: Any, what: str) -> str:
    """``name`` if it is one plain file name (no directory part, not ``.``/``..``, no NUL), else CheckpointError."""
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
            or "\x00" in name or os.path.isabs(name) or len(name) > 255):
        raise CheckpointError(f"{what}: {name!r} is not a plain file name inside the checkpoint directory")
    return name


def member(root: str | os.PathLike, name: Any, what: str, kind: str = "file") -> Path:
    """``root/name`` after checking the name and, by ``lstat`` (no open), that it is a regular file (or directory)."""
    path = Path(root) / check_name(name, what)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be examined: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path} is a symlink; checkpoint files must be regular files inside the directory")
    ok = stat.S_ISDIR(st.st_mode) if kind == "dir" else stat.S_ISREG(st.st_mode)
    if not ok:
        raise CheckpointError(f"{path} is not a regular {'directory' if kind == 'dir' else 'file'}")
    return path


def open_regular(path: str | os.PathLike):
    """Open ``path`` for reading without following a symlink or blocking on a FIFO; refuse non-regular files."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be opened: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: str | os.PathLike, limit: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise CheckpointError(f"{path} has {size} bytes, more than the {limit} a dist8 checkpoint file may have")
        data = f.read(limit + 1)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text: {exc}") from exc


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file: ``{key: {"dtype", "shape", "data_offsets"}}`` (+ ``__metadata__``).

    The 8-byte length is checked against the file size and :data:`MAX_HEADER_BYTES`
    before reading; every entry's type, shape and offsets are checked.
    """
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path} is too short for a safetensors file")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes) "
                                  f"or the {MAX_HEADER_BYTES}-byte limit")
        text = f.read(n)
    try:
        text = text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path}: safetensors header is not UTF-8 text: {exc}") from None
    header = parse_json(text, f"{path}: safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if (not isinstance(info, dict) or not isinstance(info.get("dtype"), str)
                or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list)
                or len(info["data_offsets"]) != 2
                or not all(type(v) is int and v >= 0 for v in info["shape"] + info["data_offsets"])
                or not info["data_offsets"][0] <= info["data_offsets"][1] <= data_len):
            raise CheckpointError(f"{path}: safetensors header entry {key[:80]!r} is malformed")
    return header
