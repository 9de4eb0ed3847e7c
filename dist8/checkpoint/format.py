"""The on-disk format, in one place (one concern, hence one file): names, keys, versions, the metadata schema,
its writer and its reader.

::

    CKPT/
      metadata.json                        format, version, layout, optimizer, steps, files + sha256, manifest
      model.safetensors                    model state (written by rank 0; parameters are replicated); a tied
                                           tensor once, its other names in the header (dist8.checkpoint.model_file)
      optim-00000-of-00004.safetensors     one per saving rank: "<param>::state1", "::absmax1", ...
      model-fp32.safetensors               optional (``dist8 ckpt consolidate --fp32-weights``): the model
                                           with fp32 masters, decode(param, correction) where a
                                           parameter keeps a master-weight correction

The master-weight correction (``master_weight_bits``: int8/int16, elementwise, no
per-block scale) is stored like state, ``"<param>::correction"``, each rank its piece.

Every optimizer tensor in a rank file is the rank's *piece* of a parameter, a
range of whole blocks; ``metadata.json`` says which range, so any world size
can re-slice the global sequence of blocks. Nothing is pickled.

Versions: 1 (dist8 <= 0.x before this module) has no manifest hash, quant map,
rule, effective block sizes or state dtypes; :func:`read_metadata` upgrades it in
memory (dynamic map, block-wise, the layout block size) and validates it like
version 2. Version 2 adds those fields and ``manifest_sha256``: the sha256 of the
metadata itself (canonical JSON without that key), so an edit of metadata.json
that does not also fix the hash is refused.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any

import torch

from dist8.checkpoint.dirs import (
    check_output_dir,
    install_dir,
    temp_dir,
    write_json_atomic,
)
from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.files import check_name, member, parse_json, read_text, sha256_file
from dist8.messages import brief
from dist8.optim.state_schema import (
    CORRECTION,
    GNORM,
    MAX_STATES,
    PERCENTILE_HISTORY,
    absmax_key,
    flat_length,
    is_absmax_key,
    state_key,
)
from dist8.quant import MAP_NAMES

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FP32_WEIGHTS_FILE",
    "METADATA",
    "MODEL_FILE",
    "READABLE_VERSIONS",
    "STATE_DTYPES",
    "STATE_KEYS",
    "CheckpointError",
    "check_extra",
    "check_metadata",
    "metadata_param_groups",
    "check_output_dir",
    "file_entry",
    "from_numpy_scalar",
    "install_dir",
    "manifest_hash",
    "piece_range",
    "rank_file",
    "read_metadata",
    "sha256_file",
    "split_tensor_key",
    "state_length",
    "temp_dir",
    "tensor_key",
    "verify_files",
    "write_json_atomic",
    "write_metadata",
]

FORMAT = "dist8.checkpoint"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
METADATA = "metadata.json"
MODEL_FILE = "model.safetensors"
FP32_WEIGHTS_FILE = "model-fp32.safetensors"
# Per-parameter tensors a rank file may hold, with their dtypes: the optimizer state schema's keys
# (codes uint8 or 32-bit state, absmax, clipping history, the master-weight correction int8/int16)
# and the checkpoint's own "master" (ShardedOptimizer's fp32 master copy).
STATE_DTYPES = {
    **{state_key(i): ("uint8", "float32") for i in range(1, MAX_STATES + 1)},
    **{absmax_key(i): ("float32",) for i in range(1, MAX_STATES + 1)},
    GNORM: ("float32",),
    "master": ("float32",),
    CORRECTION: ("int8", "int16"),
}
STATE_KEYS = tuple(STATE_DTYPES)
_RANK_FILE = re.compile(r"optim-([0-9]{5})-of-([0-9]{5})\.safetensors")  # fullmatch: no trailing newline
_SHA = re.compile(r"^[0-9a-f]{64}$")
_MAX_DEPTH = 64
FLOAT64_MAX_INT = 2**1023  # larger Python ints do not convert to float (a group value of 400 digits)


def rank_file(rank: int, world_size: int) -> str:
    return f"optim-{rank:05d}-of-{world_size:05d}.safetensors"


def tensor_key(param_name: str, key: str) -> str:
    return f"{param_name}::{key}"


def split_tensor_key(key: str) -> tuple[str, str]:
    """``"<param>::<state key>"`` -> ``(param, state key)``."""
    name, _, skey = key.rpartition("::")
    return name, skey


def state_length(key: str, numel: int, block_size: int) -> int:
    """Length of the flattened tensor ``key`` of a piece of ``numel`` elements (the optimizer's state schema)."""
    return flat_length(key, numel, block_size)


def piece_range(key: str, start: int, stop: int, block_size: int) -> tuple[int, int]:
    """Range of tensor ``key`` (of the whole parameter) holding elements ``[start, stop)``."""
    if is_absmax_key(key):
        return start // block_size, (stop + block_size - 1) // block_size
    if key == GNORM:
        return 0, PERCENTILE_HISTORY
    return start, stop


def file_entry(path: str | os.PathLike) -> dict[str, Any]:
    """The ``files`` entry of ``metadata.json`` for one written file: sha256 and size."""
    return {"sha256": sha256_file(path), "size": Path(path).stat().st_size}


def manifest_hash(meta: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of ``meta`` without its ``manifest_sha256`` entry."""
    body = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


# ---- validation -----------------------------------------------------------------------------------
class _Check:
    """Type checks that raise one line naming ``metadata.json`` and the key path."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, key: str, what: str) -> None:
        raise CheckpointError(f"{self.where}: {key} {what}")

    def get(self, obj: dict, key: str, path: str) -> Any:
        if key not in obj:
            self.fail(path, "is missing")
        return obj[key]

    def int_(self, value: Any, path: str, lo: int = 0, hi: int = 1 << 62) -> int:
        if type(value) is not int or not lo <= value <= hi:
            self.fail(path, f"must be an integer in [{lo}, {hi}], got {_short(value)}")
        return value

    def str_(self, value: Any, path: str) -> str:
        # printable: a newline would split the one-line errors that quote it, a lone surrogate fails to print
        if not isinstance(value, str) or not value or len(value) > 4096 or not value.isprintable():
            self.fail(path, f"must be a non-empty printable string, got {_short(value)}")
        return value

    def dict_(self, value: Any, path: str) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"must be an object, got {_short(value)}")
        return value

    def list_(self, value: Any, path: str) -> list:
        if not isinstance(value, list):
            self.fail(path, f"must be a list, got {_short(value)}")
        return value


def _group_json_value(v: Any) -> bool:
    """One param-group value as a checkpoint may hold it: None, bool, a number float64 holds, a printable string
    (an int of 400 digits, which JSON allows, failed later comparisons with OverflowError)."""
    if v is None or isinstance(v, bool):
        return True
    if isinstance(v, int):
        return abs(v) <= FLOAT64_MAX_INT
    if isinstance(v, float):
        return True  # inf/NaN: refused by name where each key's range is checked
    return isinstance(v, str) and len(v) <= 4096 and v.isprintable()


def _short(value: Any) -> str:
    return type(value).__name__ if isinstance(value, (dict, list)) else brief(value)


def _depth(value: Any, limit: int = _MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, iteratively (no recursion), stopping past ``limit``."""
    stack, deepest = [(value, 1)], 0
    while stack:
        item, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)
    return deepest


def _upgrade(meta: dict[str, Any]) -> dict[str, Any]:
    """Version 1 -> 2 in memory: the fields version 1 did not record, with the only values it could write."""
    meta = dict(meta)
    opt = dict(meta.get("optimizer") or {}) if isinstance(meta.get("optimizer"), dict) else meta.get("optimizer")
    if isinstance(opt, dict):
        opt.setdefault("quant_map", "dynamic")
        opt.setdefault("block_wise", True)
        opt.setdefault("rule", None)
        meta["optimizer"] = opt
    if isinstance(meta.get("params"), list):
        meta["params"] = [dict(p, block_size=meta.get("block_size"), state=None) if isinstance(p, dict) else p
                          for p in meta["params"]]
    return meta


def check_metadata(meta: Any, where: str) -> dict[str, Any]:
    """Validate every field of parsed ``metadata.json`` (upgrading version 1); returns it.

    Checks types and ranges of every entry, the block layout of ``params``, that
    ``pieces`` cover every parameter exactly once (overlaps and gaps are named), that
    ``files`` lists every rank file the pieces need and only plain file names, and
    (version 2) the manifest hash. Raises one-line :class:`CheckpointError`.
    """
    c = _Check(where)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    if _depth(meta) > _MAX_DEPTH:
        raise CheckpointError(f"{where} is nested more than {_MAX_DEPTH} levels deep")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: format is {_short(meta.get('format'))}, expected {FORMAT!r}")
    version = meta.get("version", 1)
    if type(version) is not int:
        c.fail("version", f"must be an integer, got {_short(version)}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {version} is newer than this dist8 reads "
                              f"({FORMAT_VERSION}); upgrade dist8")
    if version not in READABLE_VERSIONS:
        c.fail("version", f"{version} is not a dist8 checkpoint version ({READABLE_VERSIONS})")
    if version >= 2:
        stored = meta.get("manifest_sha256")
        if not isinstance(stored, str) or not _SHA.match(stored):
            c.fail("manifest_sha256", "is missing or not a sha256 hex digest")
        try:
            actual = manifest_hash(meta)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where} holds values JSON cannot represent ({exc})") from None
        if actual != stored:
            raise CheckpointError(f"{where} fails its manifest sha256 check (edited or corrupt)")
    else:
        meta = _upgrade(meta)

    block = c.int_(c.get(meta, "block_size", "block_size"), "block_size", 64, 1 << 30)
    if block & (block - 1):
        c.fail("block_size", f"must be a power of two, got {block}")
    world = c.int_(c.get(meta, "world_size", "world_size"), "world_size", 1, 1 << 20)
    if meta.get("step") is not None:
        c.int_(meta["step"], "step")
    if version >= 2:
        c.get(meta, "extra", "extra")
        c.str_(c.get(meta, "dist8_version", "dist8_version"), "dist8_version")
    if not isinstance(meta.get("extra", {}), dict):
        c.fail("extra", "must be an object")

    opt = c.dict_(c.get(meta, "optimizer", "optimizer"), "optimizer")
    c.str_(c.get(opt, "class", "optimizer.class"), "optimizer.class")
    rule = c.get(opt, "rule", "optimizer.rule") if version >= 2 else opt.get("rule")
    if rule is not None:  # None: not recorded (version 1, and what consolidate carries over from one)
        c.str_(rule, "optimizer.rule")
    if opt.get("quant_map") not in MAP_NAMES:
        c.fail("optimizer.quant_map", f"must be one of {', '.join(MAP_NAMES)}, got {_short(opt.get('quant_map'))}")
    if type(opt.get("block_wise")) is not bool:
        c.fail("optimizer.block_wise", f"must be true or false, got {_short(opt.get('block_wise'))}")
    groups = c.list_(c.get(opt, "param_groups", "optimizer.param_groups"), "optimizer.param_groups")
    for gi, g in enumerate(groups):
        c.dict_(g, f"optimizer.param_groups[{gi}]")
        for k, v in g.items():
            ok = _group_json_value(v) or (isinstance(v, list) and all(_group_json_value(x) for x in v))
            if not ok:
                c.fail(f"optimizer.param_groups[{gi}].{_short(k)}", f"must be a number (within float64's range), "
                       f"printable string or flat list of them, got {_short(v)}")

    params = c.list_(c.get(meta, "params", "params"), "params")
    numel_of: dict[str, int] = {}
    next_block = 0
    for i, p in enumerate(params):
        at = f"params[{i}]"
        c.dict_(p, at)
        name = c.str_(c.get(p, "name", f"{at}.name"), f"{at}.name")
        if "::" in name or name in numel_of:
            c.fail(f"{at}.name", f"{name!r} is duplicated or contains '::'")
        shape = c.list_(c.get(p, "shape", f"{at}.shape"), f"{at}.shape")
        if len(shape) > 16:
            c.fail(f"{at}.shape", "has more than 16 dimensions")
        for d, s in enumerate(shape):
            c.int_(s, f"{at}.shape[{d}]", 0, 1 << 40)
        numel = math.prod(shape)
        numel_of[name] = numel
        c.str_(c.get(p, "dtype", f"{at}.dtype"), f"{at}.dtype")
        nb = (numel + block - 1) // block
        if c.get(p, "first_block", f"{at}.first_block") != next_block or c.get(p, "n_blocks", f"{at}.n_blocks") != nb:
            c.fail(f"{at}.first_block/n_blocks", f"are {_short(p['first_block'])}/{_short(p['n_blocks'])}, the block "
                                                  f"layout says {next_block}/{nb}")
        next_block += nb
        c.int_(c.get(p, "group", f"{at}.group"), f"{at}.group", 0, max(len(groups) - 1, 0))
        eff = c.int_(c.get(p, "block_size", f"{at}.block_size"), f"{at}.block_size", 1, 1 << 62)
        if eff & (eff - 1):
            c.fail(f"{at}.block_size", f"must be a power of two, got {eff}")
        state = c.get(p, "state", f"{at}.state") if version >= 2 else p.get("state")
        if state is not None:
            c.dict_(state, f"{at}.state")
            for k, dt in state.items():
                if k not in STATE_DTYPES or dt not in STATE_DTYPES[k]:
                    c.fail(f"{at}.state.{_short(k)}", f"must be one of {sorted(STATE_DTYPES)} with dtype "
                                                      f"{STATE_DTYPES.get(k, '?')}, got {_short(dt)}")

    files = c.dict_(c.get(meta, "files", "files"), "files")
    for fname, info in files.items():
        check_name(fname, f"{where}: files")
        m = _RANK_FILE.fullmatch(fname)
        if fname not in (MODEL_FILE, FP32_WEIGHTS_FILE) and not (m and int(m.group(2)) == world and int(m.group(1)) < world):
            c.fail(f"files.{fname!r}", f"is not {MODEL_FILE}, {FP32_WEIGHTS_FILE} or a rank file of world size {world}")
        c.dict_(info, f"files.{fname}")
        if not isinstance(info.get("sha256"), str) or not _SHA.match(info["sha256"]):
            c.fail(f"files.{fname}.sha256", "must be a sha256 hex digest")
        c.int_(info.get("size"), f"files.{fname}.size")

    pieces = c.dict_(c.get(meta, "pieces", "pieces"), "pieces")
    covered: dict[str, list[tuple[int, int, str]]] = {}
    for rank, plist in pieces.items():
        if (not isinstance(rank, str) or not re.fullmatch("[0-9]+", rank) or int(rank) >= world
                or str(int(rank)) != rank):
            c.fail(f"pieces.{str(rank)[:20]}", f"is not a rank of world size {world}")
        fname = rank_file(int(rank), world)
        if fname not in files:
            c.fail(f"pieces.{rank}", f"needs {fname}, which 'files' does not list (so it could not be verified)")
        for j, piece in enumerate(c.list_(plist, f"pieces.{rank}")):
            at = f"pieces.{rank}[{j}]"
            if not isinstance(piece, list) or len(piece) != 4:
                c.fail(at, f"must be [name, start, stop, step], got {_short(piece)}")
            name, start, stop, step = piece
            if not isinstance(name, str) or name not in numel_of:
                c.fail(at, f"names parameter {_short(name)}, which 'params' does not list")
            c.int_(start, f"{at} start")
            c.int_(stop, f"{at} stop", start + 1 if numel_of[name] else 0, numel_of[name])
            c.int_(step, f"{at} step")
            if start % block:
                c.fail(f"{at} start", f"{start} is not on a block boundary (block size {block})")
            covered.setdefault(name, []).append((start, stop, rank))
    for name, numel in numel_of.items():
        spans = sorted(covered.get(name, []))
        if not spans and numel == 0:
            continue
        if not spans:
            raise CheckpointError(f"{where}: parameter {name} is in no piece (its state would be lost)")
        at = 0
        for start, stop, rank in spans:
            if start < at:
                raise CheckpointError(f"{where}: pieces of parameter {name} overlap at elements {start}..{at} "
                                      f"(rank {rank})")
            if start > at:
                raise CheckpointError(f"{where}: pieces of parameter {name} leave elements {at}..{start} uncovered")
            at = stop
        if at != numel:
            raise CheckpointError(f"{where}: pieces of parameter {name} leave elements {at}..{numel} uncovered")
    return meta


def check_extra(extra: Any) -> None:
    """``save(extra=...)``, the metadata's ``extra`` object, must come back from ``load`` as it went in:
    JSON data with string keys. :func:`dist8.checkpoint.save` asks this first: refused before anything is gathered or written (inf/NaN and tensors failed at the metadata, after
    the tensor files; an int key came back as a string)."""
    if extra is None:
        return
    if not isinstance(extra, dict):
        raise ValueError(f"save(extra=...) must be a dict, got {brief(extra)}")

    def keys_ok(value: Any, where: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ValueError(f"save(extra=...): key {brief(k)} {where}is not a string (JSON would give it "
                                     f"back as {str(k)!r})")
                keys_ok(v, f"under {k!r} ")
        elif isinstance(value, (list, tuple)):
            for v in value:
                keys_ok(v, where)

    keys_ok(extra, "")
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"save(extra=...) must be JSON data (str, finite numbers, bool, None, lists, dicts): "
                         f"{exc}") from None


class _NotStorable(Exception):
    pass


def from_numpy_scalar(value: Any) -> Any:
    """A numpy scalar (np.float32 from a scheduler, np.bool_, a 0-d array) as the Python value it holds;
    anything else unchanged. Param-group values are stored, and compared on load, as Python values."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _group_scalar(value: Any) -> Any:
    """One param-group value as JSON holds it, else _NotStorable."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()  # torch's tensor lr / betas; a bool tensor gives a bool
    value = from_numpy_scalar(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):  # bool is caught above
        return int(value)
    if isinstance(value, numbers.Real):
        as_float = float(value)
        if math.isfinite(as_float):
            return as_float
    raise _NotStorable


def metadata_param_groups(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The optimizer's param groups (hyperparameters only, no parameter lists) as ``metadata.json`` holds them.

    A value is stored if the same optimizer can load it back: None, a boolean, a finite number or a
    string, or a flat list of those (a tuple is stored as a list; a one-element tensor and a numpy
    scalar as the Python number). Anything else -- a NaN, a multi-element tensor, a dict, a nested
    list, an object -- is refused with a ValueError naming the group and the key. Every writer of
    optimizer metadata converts through here, before any file is written (such values failed in the
    JSON writer after the tensor files, naming nothing, or were written and then refused on load).
    """
    out = []
    for gi, group in enumerate(groups):
        stored: dict[str, Any] = {}
        for key, value in group.items():
            if not isinstance(key, str):
                raise ValueError(f"param group {gi} has the key {brief(key)}; a checkpoint stores string keys only")
            try:
                if isinstance(value, (list, tuple)):
                    stored[key] = [_group_scalar(v) for v in value]
                else:
                    stored[key] = _group_scalar(value)
            except _NotStorable:
                raise ValueError(
                    f"param group {gi} key {key!r} holds {brief(value)}, which a checkpoint cannot store: param "
                    "group values must be None, booleans, finite numbers, strings or flat lists of them; "
                    "remove or convert it before saving") from None
        out.append(stored)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Read, parse and validate ``metadata.json`` of the checkpoint directory ``path`` (see :func:`check_metadata`).

    Args:
        path: a checkpoint directory (one ``step-*`` directory, not the root of a ``keep_last`` save).

    Returns the metadata as a dict. Raises :class:`CheckpointError` naming the file when ``path`` is
    not a directory, ``metadata.json`` is missing, not a regular file, not JSON or not valid metadata.
    """
    path = Path(path)
    if not path.is_dir():
        what = "is a file, not a checkpoint directory" if path.exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {path} {what}")
    meta_path = path / METADATA
    if not os.path.lexists(meta_path):
        raise CheckpointError(f"{meta_path} is missing: {path} is not a complete dist8 checkpoint")
    member(path, METADATA, str(path))
    meta = parse_json(read_text(meta_path), str(meta_path))
    return check_metadata(meta, str(meta_path))


def write_metadata(directory: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``meta`` (stamped with format, version and manifest hash) as ``directory/metadata.json``; returns it.

    The one writer of metadata: every dist8 writer (save, consolidate, from-deepspeed) goes through here,
    and the result is validated with :func:`check_metadata` before it is written.
    """
    meta = {k: v for k, v in meta.items() if k != "manifest_sha256"}
    meta.update(format=FORMAT, version=FORMAT_VERSION)
    meta["manifest_sha256"] = manifest_hash(meta)
    check_metadata(json.loads(json.dumps(meta)), f"{directory / METADATA} (being written)")
    write_json_atomic(directory / METADATA, meta)
    return meta


def verify_files(path: str | os.PathLike, meta: dict[str, Any], names: list[str] | None = None,
                 checksums: bool = True) -> None:
    """Check size and (optionally) sha256 of the checkpoint's files; raise naming the first bad one.

    Args:
        path: the checkpoint directory.
        meta: its metadata, as :func:`read_metadata` returns it (its ``files``: name -> size and sha256).
        names: file names to check, each of which must be listed in ``meta["files"]``. Default None
            (every listed file).
        checksums: also compare each file's sha256 (reads the whole file); False checks the sizes
            only. Default True.

    Raises :class:`CheckpointError` for the first file that is not listed, missing, not a regular
    file (a symlink), of the wrong size or (with ``checksums``) of the wrong sha256.
    """
    path = Path(path)
    wanted = list(meta["files"]) if names is None else names
    for name in wanted:
        info = meta["files"].get(name)
        if info is None:
            raise CheckpointError(f"{path / name} is not listed in {METADATA} 'files' (cannot be verified)")
        file = member(path, name, str(path / METADATA))
        size = file.stat().st_size
        if size != info["size"]:
            raise CheckpointError(f"{file} has {size} bytes, metadata says {info['size']} (truncated or replaced)")
        if checksums and sha256_file(file) != info["sha256"]:
            raise CheckpointError(f"{file} fails its sha256 check (corrupt)")
