"""save / load / latest: atomic, world-size-independent checkpoints of dist8 optimizers."""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from dist8.version import __version__
from dist8.checkpoint.adapters import OptimizerAdapter, adapt
from dist8.checkpoint.format import (
    FORMAT,
    FORMAT_VERSION,
    METADATA,
    MODEL_FILE,
    CheckpointError,
    rank_file,
    read_metadata,
    file_entry,
    install_dir,
    temp_dir,
    tensor_key,
    verify_files,
    write_json_atomic,
)
from dist8.quant import num_blocks
from dist8.shard import ShardedOptimizer

__all__ = ["save", "load", "latest", "LATEST"]

LATEST = "latest"


def _barrier(ad: OptimizerAdapter | None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=ad.group if ad is not None else None)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _json_safe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def _shard_tensors(ad: OptimizerAdapter) -> tuple[dict[str, torch.Tensor], list[list]]:
    tensors: dict[str, torch.Tensor] = {}
    pieces = []
    for piece in ad.pieces:
        name = ad.names[piece.param]
        st = ad.piece_state(piece.param)
        if st:
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[tensor_key(name, key)] = value.detach().reshape(-1).contiguous().cpu()
        master = ad.master_piece(piece)
        if master is not None:
            tensors[tensor_key(name, "master")] = master.detach().contiguous().cpu()
        pieces.append([name, piece.start, piece.stop, int(st.get("step", 0)) if st else 0])
    return tensors, pieces


def save(path: str | os.PathLike, model: torch.nn.Module | None, optimizer, *, step: int | None = None,
         extra: dict[str, Any] | None = None, keep_last: int | None = None) -> str:
    """Save ``model`` and ``optimizer`` state; collective when torch.distributed is initialised.

    Args:
        path: the checkpoint directory; with ``keep_last`` it is the *root*, and the
            checkpoint goes to ``path/step-XXXXXXXX`` (``step`` required), a ``latest``
            pointer is written last and only the newest ``keep_last`` are kept.
        model: saved to ``model.safetensors`` by rank 0 (parameters are replicated
            under ShardedOptimizer); ``None`` saves only the optimizer.
        optimizer: a dist8 optimizer or :class:`dist8.ShardedOptimizer`.
        step: training step recorded in the metadata.
        extra: JSON-serialisable values returned by :func:`load` (e.g. data position).

    The directory is written under a temporary name and renamed into place, so a
    crash at any point leaves the previous checkpoint loadable. Returns the path.
    """
    ad = adapt(model, optimizer)
    if hasattr(ad, "gather"):  # FSDP2: full quantized state onto rank 0 (collective)
        ad.gather(model)
    root = Path(path)
    if keep_last is not None:
        if step is None:
            raise ValueError("save(..., keep_last=K) needs step= to name the checkpoint directory")
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        final = root / f"step-{int(step):08d}"
    else:
        final = root
    tmp = final.with_name(f".{final.name}.tmp")  # rank 0 creates it below; every rank writes into it
    saving_world = ad.world_size if isinstance(optimizer, ShardedOptimizer) else 1
    if ad.rank == 0:
        temp_dir(final)
    _barrier(ad)
    files: dict[str, dict[str, Any]] = {}
    pieces: list = []
    if ad.writes:
        tensors, pieces = _shard_tensors(ad)
        name = rank_file(ad.rank if saving_world > 1 else 0, saving_world)
        save_file(tensors, str(tmp / name), metadata={"format": FORMAT})
        files[name] = file_entry(tmp / name)
    report = {"files": files, "pieces": pieces, "rank": ad.rank}
    gathered = [report]
    if _distributed() and saving_world > 1:
        gathered = [None] * ad.world_size
        dist.all_gather_object(gathered, report, group=ad.group)
    if ad.rank == 0:
        all_files = {k: v for rep in gathered for k, v in rep["files"].items()}
        all_pieces = {str(rep["rank"]): rep["pieces"] for rep in gathered if rep["files"]}
        if model is not None:
            save_file(ad.model_state(model), str(tmp / MODEL_FILE), metadata={"format": FORMAT})
            all_files[MODEL_FILE] = file_entry(tmp / MODEL_FILE)
        group_of = ad.group_of()
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dist8_version": __version__,
            "torch_version": torch.__version__,
            "block_size": ad.layout.block_size,
            "world_size": saving_world,
            "step": step,
            "optimizer": {"class": type(ad.inner).__name__,
                          "param_groups": [{k: _json_safe(v) for k, v in g.items()} for g in ad.hyper()]},
            "params": [{"name": p.name, "shape": list(p.shape), "dtype": str(ad.params[p.index].dtype).split(".")[-1],
                        "first_block": p.first_block, "n_blocks": p.n_blocks, "group": group_of[p.index]}
                       for p in ad.layout.params],
            "pieces": all_pieces,
            "files": all_files,
            "extra": extra or {},
        }
        write_json_atomic(tmp / METADATA, meta)
        install_dir(tmp, final)
        if keep_last is not None:
            write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
            _rotate(root, keep_last)
    _barrier(ad)
    return str(final)


def _rotate(root: Path, keep_last: int) -> None:
    for stale in root.glob(".step-*.deleting"):  # left by a save killed while rotating
        shutil.rmtree(stale, ignore_errors=True)
    done = sorted(p for p in root.glob("step-*") if (p / METADATA).is_file())
    for old in done[:-keep_last]:
        # Out of latest()'s sight in one rename before any file goes: a process killed inside
        # rmtree must not leave a step-* directory whose metadata outlived its tensors.
        trash = old.with_name(f".{old.name}.deleting")
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


def latest(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint under ``root`` (from the ``latest`` pointer, else by scanning), or None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["checkpoint"]
            if (root / name / METADATA).is_file():
                return str(root / name)
        except (ValueError, KeyError):
            pass
    done = sorted(p for p in root.glob("step-*") if (p / METADATA).is_file())
    return str(done[-1]) if done else None


def _resolve(path: Path) -> Path:
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir() and (old / METADATA).is_file():
        warnings.warn(f"{path} is missing but {old} is complete (a save was interrupted); loading it", stacklevel=3)
        return old
    return path


def load(path: str | os.PathLike, model: torch.nn.Module | None, optimizer, *, strict: bool = True,
         verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save` at any world size; returns its ``extra`` dict.

    Each rank reads only the block ranges it owns under the current world size.
    ``strict=False`` loads the parameters that match by name and shape and warns
    about the rest. ``verify`` checks the sha256 of every file this rank reads.
    Raises :class:`CheckpointError` naming the file, parameter or key on any mismatch.
    """
    path = _resolve(Path(path))
    meta = read_metadata(path)
    ad = adapt(model, optimizer)
    cls = type(ad.inner).__name__
    if meta["optimizer"]["class"] != cls:
        raise CheckpointError(f"{path / METADATA}: saved optimizer is {meta['optimizer']['class']}, "
                              f"loading into {cls}")
    if meta["block_size"] != ad.layout.block_size:
        raise CheckpointError(f"{path / METADATA}: saved with block_size={meta['block_size']}, optimizer uses "
                              f"block_size={ad.layout.block_size}")
    saved = {p["name"]: p for p in meta["params"]}
    problems = []
    for slot in ad.layout.params:
        entry = saved.get(slot.name)
        if entry is None:
            problems.append(f"parameter {slot.name} is not in the checkpoint")
        elif tuple(entry["shape"]) != slot.shape:
            problems.append(f"parameter {slot.name} has shape {tuple(entry['shape'])} in the checkpoint, "
                            f"{slot.shape} in the model")
    unexpected = sorted(set(saved) - set(ad.names))
    problems += [f"checkpoint parameter {n} is not in the optimizer" for n in unexpected]
    if problems and strict:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    if problems:
        warnings.warn(f"dist8.checkpoint.load({path}, strict=False) skipped: " + "; ".join(problems), stacklevel=2)
    skip = {s.name for s in ad.layout.params if s.name not in saved or tuple(saved[s.name]["shape"]) != s.shape}

    where: dict[str, list[tuple[str, int, int]]] = {}
    for rank, plist in meta["pieces"].items():
        fname = rank_file(int(rank), meta["world_size"])
        for name, start, stop, _step in plist:
            where.setdefault(name, []).append((fname, start, stop))
    steps = {name: step for plist in meta["pieces"].values() for name, _a, _b, step in plist}
    needed = sorted({f for piece in ad.pieces if ad.names[piece.param] not in skip
                     for f, _a, _b in where.get(ad.names[piece.param], [])})
    verify_files(path, meta, needed + ([MODEL_FILE] if model is not None and MODEL_FILE in meta["files"] else []),
                 checksums=verify)
    handles = {}
    try:
        for f in needed:
            try:
                handles[f] = safe_open(str(path / f), framework="pt")
            except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt headers
                raise CheckpointError(f"{path / f} cannot be read: {exc}") from exc
        states, masters = _read_pieces(ad, where, steps, handles, skip, path)
    finally:
        handles.clear()
    if model is not None:
        ad.load_model_state(model, _read_model(path / MODEL_FILE, model, strict))
    ad.load_states(states, masters)
    for group, saved_group in zip(ad.optimizer.param_groups, meta["optimizer"]["param_groups"]):
        for k, v in saved_group.items():
            if k in group and k != "params":
                group[k] = tuple(v) if isinstance(group[k], tuple) else v
    return meta.get("extra", {})


def _read_pieces(ad: OptimizerAdapter, where, steps, handles, skip, path: Path):
    B = ad.layout.block_size
    states: dict[int, dict[str, Any]] = {}
    masters: dict[int, torch.Tensor] = {}
    for piece in ad.pieces:
        name = ad.names[piece.param]
        if name in skip or name not in where:
            continue
        parts: dict[str, list[torch.Tensor]] = {}
        covered = piece.start
        for fname, s0, s1 in sorted(where[name], key=lambda t: t[1]):
            a, b = max(piece.start, s0), min(piece.stop, s1)
            if a >= b:
                continue
            if a != covered:
                raise CheckpointError(f"{path}: pieces of parameter {name} leave elements {covered}..{a} uncovered")
            covered = b
            handle = handles[fname]
            for key in handle.keys():
                pname, _, skey = key.rpartition("::")
                if pname != name:
                    continue
                sl = handle.get_slice(key)
                if skey.startswith("absmax"):
                    lo, hi = (a - s0) // B, num_blocks(b - s0, B)
                elif skey == "gnorm_vec":
                    lo, hi = 0, sl.get_shape()[0]
                    if skey in parts:
                        continue
                else:
                    lo, hi = a - s0, b - s0
                if hi > sl.get_shape()[0]:
                    raise CheckpointError(f"{path / fname}: tensor {key} has {sl.get_shape()[0]} entries, needs {hi}")
                parts.setdefault(skey, []).append(sl[lo:hi])
        if covered != piece.stop:
            if not parts:
                continue  # no state saved for this parameter (never stepped)
            raise CheckpointError(f"{path}: parameter {name} elements {covered}..{piece.stop} are in no shard file")
        if not parts:
            continue
        st: dict[str, Any] = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items() if k != "master"}
        if "master" in parts:
            masters[piece.param] = torch.cat(parts["master"])
        if any(k.startswith("state") for k in st):
            st["step"] = steps.get(name, 0)
            device = ad.params[piece.param].device
            states[piece.param] = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in st.items()}
    return states, masters


def _read_model(file: Path, model: torch.nn.Module, strict: bool) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing (checkpoint saved without a model?)")
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{file} cannot be read: {exc}") from exc
    own = model.state_dict()
    for name, value in tensors.items():
        if name in own and tuple(own[name].shape) != tuple(value.shape):
            raise CheckpointError(f"{file}: {name} has shape {tuple(value.shape)}, model has {tuple(own[name].shape)}")
    missing, unexpected = [k for k in own if k not in tensors], [k for k in tensors if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(f"{file}: model keys missing {missing[:5]} unexpected {unexpected[:5]}")
    return {k: v for k, v in tensors.items() if k in own}
