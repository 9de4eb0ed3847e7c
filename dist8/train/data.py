"""Byte-level corpus and deterministic batch sampling.

The default corpus is the CPython standard library's ``*.py`` sources (found via
``sysconfig``; ``site-packages`` excluded), read as bytes. Files are split into
train and validation by a hash of their relative path (stable across machines and
processes), then concatenated into ``uint8`` tensors, each split capped at its
share of ``data.max_bytes``. Batches are random windows drawn by a generator
seeded from ``(seed, step, rank, micro-step)`` only, so any step of any rank can be
reproduced without replaying the steps before it (exact resume).
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import sysconfig
from pathlib import Path

import torch

from dist8.train.config import ConfigError, DataConfig

__all__ = ["ByteCorpus", "load_corpus", "stdlib_dir", "sample_seed"]

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _list_files(root: Path, pattern: str) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            # regular files only: reading a FIFO (or a device) waits for a writer forever
            if fnmatch.fnmatch(name, pattern) and path.is_file():
                files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _is_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "little")
    return (h / 2**64) < val_fraction


class ByteCorpus:
    """Train and validation byte tensors plus deterministic window sampling."""

    def __init__(self, train: torch.Tensor, val: torch.Tensor, source: str, n_files: tuple[int, int]) -> None:
        self.train = train
        self.val = val
        self.source = source
        self.n_files = n_files

    def describe(self) -> str:
        return (
            f"{self.source}: train {self.train.numel():,} bytes ({self.n_files[0]} files), "
            f"val {self.val.numel():,} bytes ({self.n_files[1]} files)"
        )

    def batch(self, split: str, seed: int, seq_len: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``batch_size`` random windows of ``seq_len + 1`` bytes -> (inputs, targets) as int64."""
        data = self.train if split == "train" else self.val
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]
        windows = data[idx].long()
        return windows[:, :-1], windows[:, 1:]


def sample_seed(*parts: int | str) -> int:
    """A 63-bit generator seed from a tuple such as ``(seed, "train", step, rank, micro)``."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def load_corpus(cfg: DataConfig, seq_len: int) -> ByteCorpus:
    """Read the corpus named by ``cfg`` (the stdlib when ``cfg.path`` is None)."""
    val_cap = max(int(cfg.max_bytes * cfg.val_fraction), seq_len + 2)
    train_cap = max(cfg.max_bytes - val_cap, seq_len + 2)
    root = Path(cfg.path) if cfg.path is not None else stdlib_dir()
    source = str(root) if cfg.path is not None else f"CPython stdlib ({root})"
    if not root.is_file() and not root.is_dir():  # a FIFO or device: reading it would wait forever
        raise ConfigError(f"config key data.path: {str(root)!r} is neither a regular file nor a directory")
    if root.is_file():
        # One file: the last val_fraction of its bytes is the validation split.
        try:
            data = root.read_bytes()[: cfg.max_bytes]
        except OSError as exc:
            raise ConfigError(f"config key data.path: cannot read {str(root)!r}: {exc.strerror or exc}") from None
        n_val = max(int(len(data) * cfg.val_fraction), seq_len + 2)
        train_b, val_b, n_files = data[:-n_val], data[-n_val:], (1, 1)
    else:
        pattern = cfg.glob or ("*.py" if cfg.path is None else "*")
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        sizes = {False: 0, True: 0}
        caps = {False: train_cap, True: val_cap}
        counts = {False: 0, True: 0}
        files = _list_files(root, pattern)
        if not files:
            key = "data.glob" if cfg.glob else "data.path"
            raise ConfigError(f"config key {key}: no file under {source} matches {pattern!r}")
        for path in files:
            rel = path.relative_to(root).as_posix()
            is_val = _is_val(rel, cfg.val_fraction)
            if sizes[is_val] >= caps[is_val]:
                if all(sizes[k] >= caps[k] for k in (False, True)):
                    break
                continue
            try:
                blob = path.read_bytes()
            except OSError:
                continue
            blob = blob[: caps[is_val] - sizes[is_val]]
            parts[is_val].append(blob)
            sizes[is_val] += len(blob)
            counts[is_val] += 1
        train_b, val_b = b"".join(parts[False]), b"".join(parts[True])
        n_files = (counts[False], counts[True])
    for name, blob in (("train", train_b), ("validation", val_b)):
        if len(blob) < seq_len + 2:
            raise ConfigError(
                f"data: the {name} split of {source} has {len(blob)} bytes, fewer than model.seq_len + 2 = {seq_len + 2}; "
                "raise data.max_bytes or data.val_fraction"
            )
    to_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)  # noqa: E731
    return ByteCorpus(to_tensor(train_b), to_tensor(val_b), source, n_files)
