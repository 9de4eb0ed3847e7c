"""save / load / latest: atomic, world-size-independent, validated checkpoints of dist8 optimizers.

One concern: the save and load procedures (their order, atomicity and agreement across ranks); the
format lives in ``format.py``, the tensor readers in ``reader.py``/``model_file.py``, names in ``names.py``.

``load`` reads and checks everything into new tensors first (metadata schema and
manifest hash, hyperparameters, piece coverage, every file listed and hashed, every
tensor's dtype, length and values) and only then installs it: a failed load changes
neither the model nor the optimizer, on any rank.
"""
from __future__ import annotations

import hashlib
import json
import numbers
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file

from dist8.checkpoint.adapters import FSDP2Adapter, OptimizerAdapter, adapt
from dist8.checkpoint.dirs import check_replaceable
from dist8.checkpoint.files import check_name, member, read_text
from dist8.checkpoint.format import (
    FORMAT,
    METADATA,
    MODEL_FILE,
    CheckpointError,
    check_extra,
    file_entry,
    install_dir,
    manifest_hash,
    metadata_param_groups,
    rank_file,
    read_metadata,
    temp_dir,
    tensor_key,
    verify_files,
    write_json_atomic,
    write_metadata,
)
from dist8.checkpoint.groups import checked_groups
from dist8.checkpoint.model_file import write_model_file
from dist8.checkpoint.replica_groups import saves_as_the_world, writer_adapter, writes_here
from dist8.checkpoint.names import state_dict_by_name
from dist8.checkpoint.reader import read_model, read_pieces
from dist8.checkpoint.shared_dir import SHARED_MARK, check_every_rank_sees
from dist8.checkpoint.weights import load_fp32_weights
from dist8.messages import brief
from dist8.optim.config import load_group_values
from dist8.optim.validation import check_flag, check_module
from dist8.shard import ShardedOptimizer
from dist8.shard.agreement import from_every_rank, raise_on_every_rank
from dist8.shard.collectives import collective_device, wait_for_every_rank
from dist8.version import __version__

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit

__all__ = ["LATEST", "checkpoints", "latest", "load", "read_pieces", "save"]

LATEST = "latest"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _every_rank_calls(ad: OptimizerAdapter, where: str, does: str) -> None:
    """Collective: a barrier that warns, after ``WAIT_WARN_SECONDS``, on a rank that called ``where``
    alone -- ``if rank == 0: dist8.checkpoint.save(...)``, torch.save's habit, waited without a word
    until the process group's timeout."""
    if _distributed() and not ad.alone and dist.get_world_size(ad.group) > 1:
        wait_for_every_rank(ad.group, collective_device(ad.group), where,
                            f"Call it on every rank, not under `if rank == 0`: {does}.")


def _agree(ad: OptimizerAdapter, error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank when any rank failed (so no rank commits alone or hangs)."""
    if ad.alone:
        if error is not None:
            raise error
        return
    raise_on_every_rank(error, ad.group, what, CheckpointError)


def _shard_tensors(ad: OptimizerAdapter) -> tuple[dict[str, torch.Tensor], list[list], dict[str, dict]]:
    tensors: dict[str, torch.Tensor] = {}
    pieces = []
    described: dict[str, dict] = {}
    for piece in ad.pieces:
        name = ad.names[piece.param]
        st = ad.piece_state(piece.param)
        keys: dict[str, str] = {}
        if st:
            for key, value in st.items():
                if torch.is_tensor(value):
                    tensors[tensor_key(name, key)] = value.detach().reshape(-1).contiguous().cpu()
                    keys[key] = str(value.dtype).split(".")[-1]
        master = ad.master_piece(piece)
        if master is not None:
            tensors[tensor_key(name, "master")] = master.detach().contiguous().cpu()
            keys["master"] = "float32"
        pieces.append([name, piece.start, piece.stop, int(st.get("step", 0)) if st else 0])
        described[name] = {"state": keys, "block_size": ad.effective_block(piece.param)}
    return tensors, pieces, described


def _write(what: Path, write) -> None:
    try:
        write()
    except (OSError, SafetensorError) as exc:  # safetensors' own error for a full disk or a file-size limit
        raise CheckpointError(f"writing {what} failed: {getattr(exc, 'strerror', None) or exc}") from exc


def _keeps_master_copies_by_setting(optimizer: Any) -> bool:
    """Whether ``master_weight_bits`` None vs 24/32 decided at construction if ``optimizer`` keeps fp32 master
    copies: a ShardedOptimizer with 16-bit parameters (fp32 ones are their own masters either way)."""
    return isinstance(optimizer, ShardedOptimizer) and any(p.dtype != torch.float32 for p in optimizer.params)


def save(path: str | os.PathLike, model: torch.nn.Module | None, optimizer: Optimizer8bit | ShardedOptimizer, *,
         step: int | None = None, extra: dict[str, Any] | None = None, keep_last: int | None = None) -> str:
    """Save ``model`` and ``optimizer`` state; collective when torch.distributed is initialised.

    Args:
        path: the checkpoint directory; with ``keep_last`` it is the *root*, and the
            checkpoint goes to ``path/step-XXXXXXXX`` (``step`` required), a ``latest``
            pointer is written last and only the newest ``keep_last`` are kept.
        model: saved to ``model.safetensors`` by rank 0 (parameters are replicated
            under ShardedOptimizer); ``None`` saves only the optimizer.
        optimizer: a dist8 optimizer or :class:`dist8.ShardedOptimizer`.
        step: training step recorded in the metadata (an int >= 0). Default None.
        extra: JSON-serialisable values returned by :func:`load` (e.g. data position). Default None ({}).
        keep_last: an int >= 1: save into ``path/step-XXXXXXXX`` (needs ``step``), then keep only the
            newest ``keep_last`` complete ``step-*`` checkpoints under ``path`` (by step number),
            deleting the older ones. Default None (``path`` is the checkpoint directory, nothing is deleted).

    ``path`` (or ``path/step-XXXXXXXX``) may be new, empty or an earlier checkpoint, which is replaced; a
    directory holding anything else is refused (saving there would delete it).

    The directory is written under a temporary name and renamed into place, so a
    crash at any point leaves the previous checkpoint loadable; a write error (disk
    full, ...) removes the temporary directory and raises :class:`CheckpointError`
    naming the file, on every rank. Returns the path.
    """
    check_module(model, "dist8.checkpoint.save: model", optional=True)
    if step is not None:  # before anything is gathered or written (a NaN would reach the JSON writer)
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = step.item()
        if not _is_integer_at_least(step, 0):
            raise ValueError(f"save(step=...) must be an integer >= 0, got {brief(step)}")
        step = int(step)  # numpy and torch integers too: the metadata is JSON
    check_extra(extra)
    root = Path(path)
    if keep_last is not None:
        if step is None:
            raise ValueError("save(..., keep_last=K) needs step= to name the checkpoint directory")
        # True passed as 1; 2.5 and strings failed after the checkpoint was written (while rotating)
        if not _is_integer_at_least(keep_last, 1):
            raise ValueError(f"keep_last must be an integer >= 1, got {brief(keep_last)}")
        keep_last = int(keep_last)
        final = root / f"step-{int(step):08d}"
    else:
        final = root
    # Every rank checks the target, and the ranks agree at their first collective below: on disks whose
    # contents differ between nodes, one rank refusing alone left the others waiting for it forever.
    refused: CheckpointError | None = None
    try:
        check_replaceable(final, METADATA)
        if keep_last is not None:
            _check_not_rotated_away(root, step, keep_last)
    except CheckpointError as exc:
        refused = exc
    if isinstance(optimizer, ShardedOptimizer):  # parameters a client copied (accelerate's prepare) first
        optimizer.adopt_parameters()
    ad = adapt(model, optimizer)
    if not saves_as_the_world(ad):  # several copies of the state: who writes each directory (replica_groups.py)
        error: Exception | None = None
        writes = writes_here(ad, final)  # the same verdict on every rank (raised on all alike)
        raise_on_every_rank(refused, None, "save", CheckpointError)  # any rank's target refused: no directory written
        try:
            if writes:
                _save_group(writer_adapter(ad), model, optimizer, final, root, step, extra, keep_last, refused)
        except Exception as exc:  # noqa: BLE001 - the other groups wait for the writer's verdict
            error = exc
        raise_on_every_rank(error, None, "save", CheckpointError)
        return str(final)
    _save_group(ad, model, optimizer, final, root, step, extra, keep_last, refused)
    return str(final)


def _save_group(ad: OptimizerAdapter, model, optimizer, final: Path, root: Path, step, extra, keep_last,
                refused: CheckpointError | None) -> None:
    """The save on the ranks of the optimizer's group (every rank but under ``process_group`` subgroups)."""
    _every_rank_calls(ad, "dist8.checkpoint.save()", "each rank writes its own blocks, rank 0 the metadata")
    # every rank, before anything is gathered or written: a value JSON cannot hold (or the optimizer could
    # not load back) failed in the metadata writer after the tensor files
    groups_meta = metadata_param_groups(ad.hyper())
    try:  # the load's own check of the values it would install (a negative lr was saved, then refused on load)
        checked_groups(groups_meta, ad.optimizer.param_groups, "dist8.checkpoint.save()", ad.inner.validate_hyper)
    except CheckpointError as exc:
        raise ValueError(f"{exc}; a checkpoint holding it would not load: fix the value before saving") from None
    if hasattr(ad, "gather"):  # FSDP2: full quantized state onto rank 0 (collective)
        ad.gather(model)
    tmp = final.with_name(f".{final.name}.tmp")  # rank 0 creates it below; every rank writes into it
    saving_world = ad.world_size if isinstance(optimizer, ShardedOptimizer) else 1
    error: BaseException | None = None
    try:
        if ad.rank == 0 and refused is None:
            _write(tmp, lambda: temp_dir(final))
        _agree(ad, refused, "save")
        if saving_world > 1 and not ad.alone:  # several ranks write their blocks into tmp
            check_every_rank_sees(tmp, final, ad.group)
        report: dict[str, Any] = {"files": {}, "pieces": [], "rank": ad.rank, "params": {}}
        try:
            if ad.writes:
                tensors, report["pieces"], report["params"] = _shard_tensors(ad)
                name = rank_file(ad.rank if saving_world > 1 else 0, saving_world)
                _write(tmp / name, lambda: save_file(tensors, str(tmp / name), metadata={"format": FORMAT}))
                report["files"][name] = file_entry(tmp / name)
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it (see _agree)
            error = exc
        _agree(ad, error, "save")
        gathered = [report]
        if _distributed() and saving_world > 1:
            gathered = [None] * ad.world_size
            dist.all_gather_object(gathered, report, group=ad.group)
        if ad.rank == 0:
            try:
                _finish(ad, model, optimizer, gathered, tmp, final, root, step, extra, keep_last, saving_world,
                        groups_meta)
            except Exception as exc:  # noqa: BLE001
                error = exc
        _agree(ad, error, "save")
    except BaseException:
        if ad.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_integer_at_least(value: Any, lowest: int) -> bool:
    """An integer (numpy's and torch's integer scalars too; not a bool, which Python counts as one) >= ``lowest``."""
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= lowest


def _finish(ad, model, optimizer, gathered, tmp, final, root, step, extra, keep_last, saving_world,
            groups_meta) -> None:
    _write(tmp / SHARED_MARK, lambda: (tmp / SHARED_MARK).unlink(missing_ok=True))
    all_files = {k: v for rep in gathered for k, v in rep["files"].items()}
    all_pieces = {str(rep["rank"]): rep["pieces"] for rep in gathered if rep["files"]}
    described = {k: v for rep in gathered for k, v in rep["params"].items()}
    if model is not None:
        model_tensors = ad.model_state(model)
        _write(tmp / MODEL_FILE, lambda: write_model_file(tmp / MODEL_FILE, model_tensors, {"format": FORMAT}))
        all_files[MODEL_FILE] = file_entry(tmp / MODEL_FILE)
    group_of = ad.group_of()
    inner = ad.inner
    meta = {
        "dist8_version": __version__,
        "torch_version": torch.__version__,
        "block_size": ad.layout.block_size,
        "world_size": saving_world,
        "step": step,
        "optimizer": {"class": type(inner).__name__, "rule": inner.rule.name, "quant_map": inner.quant_map,
                      "block_wise": inner.block_wise,
                      "param_groups": groups_meta},
        "params": [{"name": p.name, "shape": list(p.shape), "dtype": str(ad.params[p.index].dtype).split(".")[-1],
                    "first_block": p.first_block, "n_blocks": p.n_blocks, "group": group_of[p.index],
                    "block_size": described.get(p.name, {}).get("block_size", ad.layout.block_size),
                    "state": described.get(p.name, {}).get("state", {})}
                   for p in ad.layout.params],
        "pieces": all_pieces,
        "files": all_files,
        "extra": extra or {},
    }
    write_metadata(tmp, meta)
    _write(final, lambda: install_dir(tmp, final))
    if keep_last is not None:
        write_json_atomic(root / LATEST, {"checkpoint": final.name, "step": step})
        _rotate(root, keep_last)


def _check_not_rotated_away(root: Path, step: int, keep_last: int) -> None:
    """Refuse a save that its own rotation would delete at once: ``root`` already holds ``keep_last`` or
    more complete checkpoints of higher steps (an earlier, longer run's). The save went through, the
    rotation removed it, and ``latest`` pointed at a checkpoint that was gone, silently."""
    newer = [name for name in (Path(p).name for p in checkpoints(root)) if name > f"step-{step:08d}"]
    if len(newer) >= keep_last:
        shown = ", ".join(newer[:3]) + (", ..." if len(newer) > 3 else "")
        raise CheckpointError(f"{root} holds {len(newer)} checkpoints of later steps than {step} ({shown}), an "
                              f"earlier run's: keeping the newest "
                              f"{keep_last} would delete this save at once; continue that run, or save into "
                              "another directory")


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


def checkpoints(root: str | os.PathLike) -> list[str]:
    """Complete-looking ``step-*`` checkpoints under ``root``, newest first (symlinks are skipped).

    Args:
        root: the directory ``save(root, ..., keep_last=K)`` writes into. A missing one holds none ([]).

    A directory counts when it holds a ``metadata.json``; newest means the highest step number
    (the zero-padded names sorted).
    """
    root = Path(root)
    found = [p for p in root.glob("step-*") if not p.is_symlink() and p.is_dir() and (p / METADATA).is_file()]
    return [str(p) for p in sorted(found, reverse=True)]


def latest(root: str | os.PathLike) -> str | None:
    """The newest complete checkpoint under ``root`` (from the ``latest`` pointer, else by scanning), or None.

    Args:
        root: the directory ``save(root, ..., keep_last=K)`` writes into.

    Returns the checkpoint directory's path, or None when there is none. An unreadable pointer, or
    one naming a checkpoint without ``metadata.json``, falls back to :func:`checkpoints`. A pointer
    naming anything but a directory directly inside ``root`` (an absolute
    path, ``..``, a symlink) is refused with :class:`CheckpointError`.
    """
    root = Path(root)
    pointer = root / LATEST
    if os.path.lexists(pointer):
        member(root, LATEST, str(root))
        try:
            name = json.loads(read_text(pointer, limit=1 << 16))["checkpoint"]
        except (ValueError, KeyError, TypeError, RecursionError):
            name = None  # unreadable pointer (e.g. killed mid-write before the atomic rename existed): scan
        if name is not None:
            check_name(name, f"{pointer}: checkpoint")
            if (root / name / METADATA).is_file():
                member(root, name, str(pointer), kind="dir")
                return str(root / name)
    done = checkpoints(root)
    return done[0] if done else None


def _resolve(path: Path) -> Path:
    old = path.with_name(f".{path.name}.old")
    if not path.exists() and old.is_dir() and (old / METADATA).is_file():
        warnings.warn(f"{path} is missing but {old} is complete (a save was interrupted); loading it", stacklevel=3)
        return old
    return path


def _identity(meta: dict[str, Any] | None) -> tuple[Any, str] | None:
    """What tells checkpoints apart whatever their paths (which may differ between nodes): step and manifest
    hash (the hash of the metadata, whose file entries hold every tensor file's sha256). None: unread."""
    if meta is None:
        return None
    return meta.get("step"), meta.get("manifest_sha256") or manifest_hash(meta)  # version 1 stores none


def _same_checkpoint_on_every_rank(ad: OptimizerAdapter, given: Path, path: Path,
                                   meta: dict[str, Any] | None) -> None:
    """Collective: every rank loads the same checkpoint, before any rank reads its tensors.

    Each rank decides from what it was given and its own disk: a rank that saw only an interrupted save's
    ``.NAME.old`` (:func:`_resolve`) loaded it while the others loaded the new one, and ranks given
    different directories (``latest()`` on node-local disks) loaded different steps; either way the ranks
    trained on as a patchwork of two runs, silently. A rank whose metadata could not be read (``meta``
    None) is left out here; its error is raised on every rank after the reads.

    Only ranks whose optimizers hold the same parameters (names and shapes) are compared: pipeline
    stages hold other parameters and load their own checkpoints (refused as "different checkpoints"
    until 2026-12-04)."""
    holds = hashlib.sha256(repr([(p.name, tuple(p.shape)) for p in ad.layout.params]).encode()).hexdigest()
    everyone = from_every_rank((path != given, str(path), _identity(meta), holds), ad.group)
    for kind in dict.fromkeys(h for *_, h in everyone):  # each kind of copy alone, in rank order
        _same_checkpoint([entry[:3] if entry[3] == kind else None for entry in everyone], given)


def _same_checkpoint(everyone: list, given: Path) -> None:
    """``everyone[rank]``: (fell back to ``.old``, path, identity) of the ranks compared, None for the others."""
    fell_back = [entry[0] if entry is not None else None for entry in everyone]
    if True in fell_back and False in fell_back:
        old, new = fell_back.index(True), fell_back.index(False)
        raise CheckpointError(f"{given} is missing on rank {old}, which would load the interrupted save's "
                              f".{given.name}.old instead, while rank {new} loads the checkpoint itself: the ranks' "
                              "disks differ; give every rank the same checkpoint")
    read = [(rank, entry[1], entry[2]) for rank, entry in enumerate(everyone)
            if entry is not None and entry[2] is not None]
    differ = [entry for entry in read if entry[2] != read[0][2]]
    if differ:
        shown = [f"rank {rank} loads {where} (step {step}, manifest sha256 {digest[:12]})"
                 for rank, where, (step, digest) in (read[0], differ[0])]
        raise CheckpointError(f"the ranks were given different checkpoints: {shown[0]}, {shown[1]}; give every rank "
                              "the same one (e.g. resolve latest() on one rank, or on a disk every rank shares)")


@dataclass
class _Plan:
    """Everything a load installs, read and checked, not yet installed."""

    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    masters: dict[int, torch.Tensor] = field(default_factory=dict)
    model: dict[str, torch.Tensor] | None = None
    groups: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def load(path: str | os.PathLike, model: torch.nn.Module | None, optimizer: Optimizer8bit | ShardedOptimizer, *,
         strict: bool = True, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save` at any world size; returns its ``extra`` dict.

    Args:
        path: the checkpoint directory: for a ``keep_last`` save, one ``step-*`` directory such
            as :func:`latest` returns (the root raises :class:`CheckpointError` naming its newest).
            If it is missing but an interrupted save left a complete ``.NAME.old`` beside it,
            that one is loaded, with a warning.
        model: the model whose tensors are loaded from the checkpoint's ``model.safetensors``, and
            whose parameter names match the saved ones. None: only the optimizer state is loaded
            (names from the optimizer); not for an optimizer of FSDP2 (DTensor) parameters.
        optimizer: a dist8 optimizer or :class:`dist8.ShardedOptimizer` of the saved class, update
            rule, quantization map and block size, at any world size.
        strict: True (default): every parameter of the optimizer and the checkpoint (and every model
            tensor) must be in both, with the same shape. False loads the parameters (and model
            tensors) that match by name and shape and warns about the rest.
        verify: check the sha256 of every file this rank reads (default True); False checks the sizes
            and everything else but skips the hashing.

    Each rank reads only the block ranges it owns under the current world size.
    Everything is read and validated before anything is installed: on
    :class:`CheckpointError` (naming the file, parameter or key) the model and
    optimizer are unchanged on every rank.
    """
    strict, verify = check_flag(strict, "strict"), check_flag(verify, "verify")  # None/"yes" were truthiness
    check_module(model, "dist8.checkpoint.load: model", optional=True)
    given = Path(path)
    path = _resolve(given)
    ad = adapt(model, optimizer)
    _every_rank_calls(ad, "dist8.checkpoint.load()", "each rank reads the blocks it owns")
    meta, plan, error = None, None, None
    try:  # what each rank finds on its disk is agreed below (one rank refusing alone left the others waiting)
        if path.is_dir() and not os.path.lexists(path / METADATA):
            found = latest(path)
            if found is not None:  # a newcomer's save(root, keep_last=K) then load(root)
                raise CheckpointError(f"{path} is a checkpoint root (step-* checkpoints and a {LATEST!r} pointer, "
                                      f"as save(..., keep_last=K) writes): load dist8.checkpoint.latest(root), "
                                      f"here {found}")
        meta = read_metadata(path)
    except Exception as exc:  # noqa: BLE001 - re-raised below after every rank has learnt of it
        error = exc
    _same_checkpoint_on_every_rank(ad, given, path, meta)
    if error is None:
        try:
            ad, plan = _read(path, meta, ad, model, strict, verify)
        except Exception as exc:  # noqa: BLE001 - as above
            error = exc
    _agree(ad, error, f"loading {path}")
    _commit(ad, model, plan, path)
    return plan.extra


def _commit(ad: OptimizerAdapter, model, plan: _Plan, path: Path) -> None:
    snap = ad.snapshot()
    error: CheckpointError | None = None
    try:
        # the groups first: the kind of state each parameter takes (e.g. its master_weight_bits correction)
        # follows the loaded values, as with load_state_dict
        kind_changes = [load_group_values(group, values, warn=False)  # warned once everything is loaded
                        for group, values in zip(ad.optimizer.param_groups, plan.groups)]
        ad.load_states(plan.states, plan.masters)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        ad.restore(snap)
        error = CheckpointError(f"{path}: state does not fit the optimizer: {exc}")
        error.__cause__ = exc
    # A rank checks the state of its own pieces only: one refusing alone left the others loaded (and
    # training on, or waiting in load_fp32_weights' collective) while it raised. Every rank undoes it.
    try:
        _agree(ad, error, f"loading {path}")
    except CheckpointError:
        if error is None:
            ad.restore(snap)
        raise
    for message in dict.fromkeys(m for m in kind_changes if m):  # optim_bits/min_8bit_size changed: said, as
        warnings.warn(message, UserWarning, stacklevel=3)  # load_state_dict says it (it was silent here)
    if plan.model is not None:  # validated (names, shapes) above; copying cannot fail
        wider = _wider_than_their_parameters(ad, model, plan.model)  # first: torch's FSDP2 load edits the dict
        ad.load_model_state(model, plan.model)
        if plan.masters and not isinstance(ad.optimizer, ShardedOptimizer):
            # a ShardedOptimizer's fp32 master copies of 16-bit parameters, loaded into an optimizer without
            # them: encoded into parameter and correction where master_weight_bits keeps one (dropped, the run
            # went on from the bf16-rounded weights: up to half a bf16 unit off, silently)
            wider.update({ad.names[i]: m.view(ad.params[i].shape) for i, m in plan.masters.items()})
        if wider:
            load_fp32_weights(wider, model, ad.optimizer, strict=False)


def _wider_than_their_parameters(ad: OptimizerAdapter, model: torch.nn.Module,
                                 tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 tensors of a checkpoint (of an fp32 run) whose parameters here are bf16/fp16.

    The model load rounds them, and an optimizer that keeps more precision (``master_weight_bits``'
    correction, ``ShardedOptimizer``'s fp32 master copies) would continue from the rounded values (up
    to half a bf16 ulp off, 5e-4 on unit weights): :func:`_commit` loads them again through
    :func:`load_fp32_weights`, which encodes the fp32 values into parameter and correction or master.
    Decided from the model file and the model alone, the same on every rank (the ShardedOptimizer's
    load is collective). A 16-bit parameter never had a correction or master in an fp32 run, so
    nothing loaded from the checkpoint is replaced.
    """
    own = state_dict_by_name(model, ad.wrapped, keep_vars=True)
    params = {id(p) for p in ad.params}
    return {name: t for name, t in tensors.items()
            if t.dtype == torch.float32 and name in own and id(own[name]) in params
            and own[name].dtype in (torch.bfloat16, torch.float16)}


def _check_optimizer(meta: dict[str, Any], ad: OptimizerAdapter, where: str) -> None:
    inner, opt = ad.inner, meta["optimizer"]
    checks = [("class", opt["class"], type(inner).__name__),
              ("rule", opt["rule"] if opt["rule"] is not None else inner.rule.name, inner.rule.name),
              ("quant_map", opt["quant_map"], inner.quant_map),
              ("block_wise", opt["block_wise"], inner.block_wise),
              ("block_size", meta["block_size"], ad.layout.block_size)]
    for what, saved, mine in checks:
        if saved != mine:
            raise CheckpointError(f"{where}: saved with {what}={saved!r}, the optimizer uses {what}={mine!r}")


def _read(path: Path, meta: dict[str, Any], ad: OptimizerAdapter, model, strict: bool,
          verify: bool) -> tuple[OptimizerAdapter, _Plan]:
    where = str(path / METADATA)
    on_meta = [n for n, p in zip(ad.names, ad.params) if p.is_meta]
    if on_meta:
        raise CheckpointError(f"{path}: parameter {on_meta[0]} is on the meta device; materialize the model "
                              "(model.to_empty(device=...)) before loading into it")
    saved_names = {p["name"] for p in meta["params"]}
    if model is not None and not set(ad.names) <= saved_names and not isinstance(ad, FSDP2Adapter):
        wrapped = adapt(model, ad.optimizer, wrapped=True)
        if set(wrapped.names) <= saved_names:  # written before checkpoints dropped the wrappers' names
            ad = wrapped
    _check_optimizer(meta, ad, where)
    plan = _Plan(groups=checked_groups(meta["optimizer"]["param_groups"], ad.optimizer.param_groups, where,
                                       ad.inner.validate_hyper,
                                       fixed_master_weight_bits=_keeps_master_copies_by_setting(ad.optimizer)),
                 extra=meta["extra"])
    saved = {p["name"]: p for p in meta["params"]}
    problems = []
    for slot in ad.layout.params:
        entry = saved.get(slot.name)
        if entry is None:
            problems.append(f"parameter {slot.name} is not in the checkpoint")
        elif tuple(entry["shape"]) != slot.shape:
            problems.append(f"parameter {slot.name} has shape {tuple(entry['shape'])} in the checkpoint, "
                            f"{slot.shape} in the model")
    problems += [f"checkpoint parameter {n} is not in the optimizer" for n in sorted(set(saved) - set(ad.names))]
    # Each group's values load by its index: a parameter now in another group than at save would train with that
    # group's lr and weight decay, silently (torch's load_state_dict refuses such a regrouping too)
    group_index = ad.group_index()
    regrouped = [f"parameter {slot.name} is in param group {group_index[id(ad.params[slot.index])]} here but was "
                 f"saved in group {saved[slot.name]['group']}" for slot in ad.layout.params
                 if slot.name in saved and id(ad.params[slot.index]) in group_index
                 and saved[slot.name]["group"] != group_index[id(ad.params[slot.index])]]
    if regrouped:
        raise CheckpointError(f"{path}: " + "; ".join(regrouped[:3]) + (" ..." if len(regrouped) > 3 else "")
                              + ": each group's values load by its position; build the optimizer's param groups "
                              "as they were at save")
    if problems and strict:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    if problems:
        warnings.warn(f"dist8.checkpoint.load({path}, strict=False) skipped: " + "; ".join(problems), stacklevel=3)
    skip = {s.name for s in ad.layout.params if s.name not in saved or tuple(saved[s.name]["shape"]) != s.shape}
    for piece in ad.pieces:
        name = ad.names[piece.param]
        if name not in skip and saved[name]["block_size"] != ad.effective_block(piece.param):
            raise CheckpointError(f"{where}: parameter {name} was quantized in blocks of {saved[name]['block_size']}, "
                                  f"the optimizer uses {ad.effective_block(piece.param)}")

    load_model = model is not None
    if load_model and MODEL_FILE not in meta["files"]:
        raise CheckpointError(f"{path / MODEL_FILE} is not in the checkpoint (saved without a model?)")
    _read_pieces(ad, meta, skip, path, plan, verify)
    if load_model:
        verify_files(path, meta, [MODEL_FILE], checksums=verify)
        plan.model = read_model(path / MODEL_FILE, model, strict, ad.wrapped)
    return ad, plan


def _read_pieces(ad: OptimizerAdapter, meta, skip, path: Path, plan: _Plan, verify: bool) -> None:
    wanted = {ad.names[p.param]: (p.start, p.stop) for p in ad.pieces if ad.names[p.param] not in skip}
    index = {ad.names[p.param]: p.param for p in ad.pieces}
    for name, st in read_pieces(path, meta, wanted, ad.inner.rule, verify).items():
        i = index[name]
        master = st.pop("master", None)
        if master is not None:
            plan.masters[i] = master
        if any(k.startswith("state") for k in st):
            device = ad.params[i].device
            plan.states[i] = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in st.items()}

