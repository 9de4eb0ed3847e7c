"""Checkpoints of the training job (one concern: the job's checkpoint directories -- which writer, the
atomic protocol of its own writers, finding the newest intact one, loading it).

Layout: ``<checkpoint.dir>/step-<8 digits>/`` per checkpoint, the newest
``checkpoint.keep`` kept. Which writer is used depends on what is being trained:

``dist8``  dist8 optimizers and ``ShardedOptimizer``: :mod:`dist8.checkpoint`
           (``save(root, model, optimizer, step=, extra=, keep_last=)``, ``load``,
           ``latest``): atomic, world-size independent, codes + absmax as they are.
``dcp``    ``sharding.mode: fsdp2``: :func:`dist8.integrations.fsdp.save_dcp` /
           ``load_dcp`` (torch.distributed.checkpoint) inside this module's atomic
           directory protocol below.
``torch``  anything else (the ``torch.adamw`` baseline, DeepSpeed's optimizer, or
           dist8 optimizers while ``dist8.checkpoint`` is not importable): a per-rank
           ``torch.save`` of ``model.state_dict()`` + ``optimizer.state_dict()``;
           same world size only.

The atomic protocol of the ``dcp`` and ``torch`` writers: rank 0 creates
``.step-N.tmp`` and every rank reads back a mark written there
(:func:`dist8.checkpoint.shared_dir.check_every_rank_sees`: node-local disks are refused before
anything is written); every rank writes (``torch``: ``rankR.pt.part`` renamed to
``rankR.pt``); barrier; rank 0 writes ``train_meta.json`` (step, extra, every
file with its size and sha256, ``dcp``'s too) last, renames the directory into place (an
existing one is renamed out of sight first) and rotates old ones by
rename-then-delete. A crash at any point leaves the previous checkpoint loadable
and nothing that :meth:`Checkpointer.latest` would pick; a write error removes the
temporary directory and raises :class:`~dist8.checkpoint.CheckpointError` naming the file.

A root that holds another writer's checkpoints (:func:`writer_of`) is refused when the
:class:`Checkpointer` is made: this run could not resume them and would replace them.

Nothing is unpickled: ``torch`` files are read with ``torch.load(weights_only=True)``
(plus the few DeepSpeed classes its optimizer states hold); a ``dcp`` checkpoint's pickled
``.metadata`` is read through an allowlist of DCP's metadata classes and checked, DCP is given
that metadata instead of unpickling the file (:func:`dist8.checkpoint.torch_files.checked_dcp_reader`),
and DCP's byte items are loaded under forced ``weights_only``. ``latest()`` returns the
newest checkpoint that passes its integrity checks, saying which it skipped and why.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import dist8.checkpoint as dist8_checkpoint
from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.files import member, read_text, sha256_file
from dist8.checkpoint.format import METADATA
from dist8.checkpoint.shared_dir import SHARED_MARK, check_every_rank_sees
from dist8.checkpoint.torch_files import check_dcp_metadata, load_torch_file, weights_only_loads
from dist8.optim import Optimizer8bit
from dist8.shard import ShardedOptimizer
from dist8.shard.agreement import failures_on_every_rank, raise_on_every_rank, rank_0_answer

__all__ = ["Checkpointer", "writer_of"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_META = "train_meta.json"


_WRITERS = {"dist8": "dist8.checkpoint", "dcp": "torch.distributed.checkpoint (dist8.integrations.fsdp)",
            "torch": "torch.save per rank"}


def writer_of(path: Path) -> str | None:
    """Which writer made the checkpoint directory ``path``: ``dist8``, ``dcp`` or ``torch``; None if it holds none."""
    if (path / METADATA).is_file():
        return "dist8"
    if not (path / _META).is_file():
        return None
    try:
        writer = _read_meta(path).get("writer", "torch")  # written before "writer" existed: torch
    except CheckpointError:
        return None  # unreadable: latest() reports it when it gets there
    return writer if writer in ("dcp", "torch") else None


def _is_dist8_optimizer(optimizer: Any) -> bool:
    return isinstance(optimizer, (Optimizer8bit, ShardedOptimizer))


class Checkpointer:
    """Save / find / load the job's checkpoints under one root directory."""

    def __init__(self, root: str, mode: str, model, optimizer, keep_last: int) -> None:
        self.root = root
        self.model = model
        self.optimizer = optimizer
        self.keep_last = keep_last
        self.mode = mode
        if mode == "fsdp2":
            self.kind = "dcp"
        elif _is_dist8_optimizer(optimizer):
            self.kind = "dist8"
        else:
            self.kind = "torch"
        # rank 0's view on every rank, as latest(): a rank refusing alone left the others waiting in the next
        # collective
        rank_0_answer(self._refuse_other_writers, error_type=CheckpointError)

    def describe(self) -> str:
        return _WRITERS[self.kind]

    def _refuse_other_writers(self) -> None:
        """One line when the root holds checkpoints of another writer: this run could not resume them
        (``latest()`` would not see them) and its saves would replace or rotate them away."""
        root = Path(self.root)
        try:
            entries = sorted(root.iterdir(), reverse=True) if root.is_dir() else []
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint.dir {self.root}: {exc.strerror or exc}") from None
        for entry in entries:
            writer = writer_of(entry) if _STEP_DIR.match(entry.name) and not entry.is_symlink() else None
            if writer is not None and writer != self.kind:
                why = {"dcp": "sharding.mode fsdp2", "dist8": "a dist8 optimizer"}.get(
                    self.kind, f"sharding.mode {self.mode}, optimizer {type(self.optimizer).__name__}")
                raise CheckpointError(f"{entry} was written by {_WRITERS[writer]}; this run ({why}) writes "
                                      f"{_WRITERS[self.kind]}, so it could not resume it and would replace it: run with the "
                                      "optimizer and sharding.mode that wrote it, or use another checkpoint.dir")

    # ---- public -----------------------------------------------------------------
    def save(self, step: int, extra: dict[str, Any]) -> str:
        if self.kind == "dist8":
            return dist8_checkpoint.save(self.root, self.model, self.optimizer, step=step, extra=extra,
                                     keep_last=self.keep_last)
        return self._atomic_save(step, extra)

    def latest(self) -> str | None:
        """The newest checkpoint under the root that passes its integrity checks (files listed, sizes,
        sha256, metadata), or None; each newer one skipped is reported on stderr (rank 0) with the reason.

        Collective on several ranks: rank 0 checks and every rank takes its answer. Each rank used to
        check on its own, so a read that failed on one rank only (a network filesystem's hiccup) sent
        that rank back to an older checkpoint than the others, silently, and every rank read every
        file of the checkpoint for its hashes."""
        return rank_0_answer(self._latest_intact, error_type=CheckpointError)

    def newest_present(self) -> str | None:
        """The newest checkpoint of this writer under the root, complete-looking but not checked, or None;
        rank 0's answer on every rank (collective on several ranks)."""
        return rank_0_answer(self._newest_present, error_type=CheckpointError)

    def _newest_present(self) -> str | None:
        present = self._present()
        return present[0] if present else None

    def _present(self) -> list[str]:
        """This writer's complete-looking checkpoints under the root, newest (highest step) first."""
        if self.kind == "dist8":
            return [os.fspath(c) for c in dist8_checkpoint.checkpoints(self.root)]
        return [os.path.join(self.root, f"step-{s:08d}") for s in sorted(_complete_steps(Path(self.root)),
                                                                          reverse=True)]

    def _latest_intact(self) -> str | None:
        if not os.path.isdir(self.root):
            return None
        candidates = self._present()
        if self.kind == "dist8":  # the `latest` pointer (the last save) first
            first = dist8_checkpoint.latest(self.root)
            if first is not None:
                candidates = [os.fspath(first)] + [c for c in candidates if c != os.fspath(first)]
            check = _check_dist8
        else:
            check = _check_own
        skipped = []
        for path in candidates:
            try:
                check(Path(path))
            except CheckpointError as exc:
                skipped.append((path, exc))
                continue
            for bad, exc in skipped:
                _say(f"checkpoint {bad} is not intact ({' '.join(str(exc).split())}); falling back to {path}")
            return path
        for bad, exc in skipped:
            _say(f"checkpoint {bad} is not intact ({' '.join(str(exc).split())})")
        if skipped:
            raise CheckpointError(f"{self.root}: no intact checkpoint (newest {skipped[0][0]}: {skipped[0][1]})")
        return None

    def load(self, path: str) -> dict[str, Any]:
        if self.kind == "dist8":
            return dict(dist8_checkpoint.load(path, self.model, self.optimizer) or {})
        rank, world = _rank_world()
        # Every rank reads and checks its files first, and the ranks agree before anything is loaded: one
        # rank refusing alone (its copy unreadable) left the others in load_dcp's collectives, or training.
        every_rank: list | None = None
        with failures_on_every_rank(None, f"resuming from {path}", CheckpointError):
            meta = _read_meta(Path(path))
            if self.kind == "dcp":
                # sizes and sha256 of every file; then the metadata through its allowlist and checks (load_dcp
                # hands DCP the checked metadata, and loads byte items under forced weights_only)
                _check_own(Path(path))
                check_dcp_metadata(member(member(Path(path), "dcp", str(path), kind="dir"), ".metadata",
                                          str(Path(path) / "dcp")))
            else:
                if meta["world_size"] != world:
                    hint = (f"resume with {meta['world_size']} ranks (each file holds its rank's DeepSpeed ZeRO "
                            "partition)" if self.mode == "deepspeed" else
                            "dist8 optimizers use dist8.checkpoint, which can")
                    raise CheckpointError(f"checkpoint {path} was saved by {meta['world_size']} ranks, this job has "
                                          f"{world}; the per-rank torch.save format cannot reshard ({hint})")
                own = self._rank_blob(Path(path), meta, rank)
                if _takes_every_rank(self.optimizer):
                    # DeepSpeed's ZeRO optimizers load the list of every rank's state dict (their fp32 master
                    # partitions are restored from all of them), as engine.load_checkpoint passes it.
                    every_rank = [(own if r == rank else self._rank_blob(Path(path), meta, r))["optimizer"]
                                  for r in range(world)]
        if self.kind == "dcp":
            from dist8.integrations import fsdp

            with weights_only_loads():
                fsdp.load_dcp(os.path.join(path, "dcp"), self.model, self.optimizer)
        else:
            problem = None
            try:
                self._install(own, every_rank)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
                problem = CheckpointError(f"{path}/rank{rank:05d}.pt does not fit the model/optimizer: "
                                          f"{' '.join(str(exc).split())[:300]}")
            raise_on_every_rank(problem, None, f"resuming from {path}", CheckpointError)
        return dict(meta.get("extra", {}))

    def _install(self, own: dict[str, Any], every_rank: list | None) -> None:
        """Load this rank's file (and, for DeepSpeed's ZeRO optimizers, every rank's optimizer state)."""
        model_sd = own["model"]
        if any(hasattr(p, "ds_tensor") for p in self.model.parameters()):
            # ZeRO-3 partitions the parameters (placeholders here); its optimizer restores them from
            # the saved fp32 partitions below, so only the buffers come from the model entry.
            params = dict(self.model.named_parameters())
            model_sd = {k: v for k, v in model_sd.items() if k not in params}
            missing = set(self.model.state_dict()) - set(params) - set(model_sd)
            if missing:
                raise KeyError(f"buffers {sorted(missing)} are not in the checkpoint")
            self.model.load_state_dict(model_sd, strict=False)
        else:
            self.model.load_state_dict(model_sd)
        if every_rank is not None:
            self.optimizer.load_state_dict(every_rank, load_from_fp32_weights=True)
        else:
            self.optimizer.load_state_dict(own["optimizer"])

    @staticmethod
    def _rank_blob(path: Path, meta: dict[str, Any], rank: int) -> dict[str, Any]:
        blob = load_torch_file(_verified(path, meta, f"rank{rank:05d}.pt"), allowed=_allowed_globals())
        if not isinstance(blob, dict) or "model" not in blob or "optimizer" not in blob:
            raise CheckpointError(f"{path}/rank{rank:05d}.pt has no 'model' and 'optimizer' entries")
        return blob

    # ---- the atomic directory protocol of the dcp / torch writers -----------------------
    def _atomic_save(self, step: int, extra: dict[str, Any]) -> str:
        rank, world = _rank_world()
        root = Path(self.root)
        final = root / f"step-{step:08d}"
        tmp = final.with_name(f".{final.name}.tmp")
        error: BaseException | None = None
        if rank == 0:
            try:
                _remove(tmp)
                tmp.mkdir(parents=True)
            except OSError as exc:
                error = CheckpointError(f"writing {tmp} failed: {exc.strerror or exc}")
        _agree(error)
        try:  # DCP's writer made its own tmp on a rank that saw none (node-local disks), silently
            check_every_rank_sees(tmp, final, what="checkpoint save")
        except CheckpointError:
            _remove_on_rank_0(tmp, rank)
            raise
        entry: dict[str, Any] = {}
        try:
            if self.kind == "dcp":
                from dist8.integrations import fsdp

                fsdp.save_dcp(str(tmp / "dcp"), self.model, self.optimizer)
            else:
                blob = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
                name = f"rank{rank:05d}.pt"
                part = tmp / f"{name}.part"
                try:
                    torch.save(blob, part)
                    os.replace(part, tmp / name)
                except OSError as exc:
                    raise CheckpointError(f"writing {part} failed: {exc.strerror or exc}") from exc
                entry = {name: _file_entry(tmp / name)}
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it
            error = exc
        try:
            _agree(error)
        except BaseException:  # any rank's write failed: rank 0 removes the half-written directory
            _remove_on_rank_0(tmp, rank)
            raise
        files = [entry]
        if dist.is_initialized() and world > 1:
            files = [None] * world
            dist.all_gather_object(files, entry)
        if rank == 0:
            try:
                (tmp / SHARED_MARK).unlink(missing_ok=True)
                if self.kind == "dcp":  # every rank's DCP files are in (the barrier above): list them all
                    files = [{f"dcp/{f.name}": _file_entry(f)
                              for f in sorted((tmp / "dcp").iterdir()) if f.is_file()}]
                meta = {"step": step, "world_size": world, "writer": self.kind, "extra": extra,
                        "files": {k: v for e in files for k, v in e.items()}}
                part = tmp / f"{_META}.part"
                part.write_text(json.dumps(meta))
                os.replace(part, tmp / _META)
                for stale in root.glob(".step-*.deleting"):  # left by a save killed while deleting
                    _remove(stale)
                if final.exists():  # replaced: out of latest()'s sight in one rename, then deleted
                    trash = final.with_name(f".{final.name}.deleting")
                    os.replace(final, trash)
                    os.replace(tmp, final)
                    _remove(trash)
                else:
                    os.replace(tmp, final)
                for old in sorted(_complete_steps(root))[: -self.keep_last]:
                    trash = root / f".step-{old:08d}.deleting"
                    os.replace(root / f"step-{old:08d}", trash)
                    _remove(trash)
            except OSError as exc:
                error = CheckpointError(f"writing checkpoint {final} failed: {exc.strerror or exc} "
                                        f"({exc.filename or final})")
        if error is not None and rank == 0:
            _remove(tmp)
        _agree(error)
        return str(final)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _remove_on_rank_0(tmp: Path, rank: int) -> None:
    if rank == 0:
        _remove(tmp)


def _agree(error: BaseException | None) -> None:
    """Collective: every rank raises when any rank failed (no rank waits forever at the next barrier)."""
    raise_on_every_rank(error, None, "checkpoint save", CheckpointError)


def _say(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(f"[dist8 train] note: {msg}", file=sys.stderr, flush=True)


def _takes_every_rank(optimizer: Any) -> bool:
    """Whether ``optimizer.load_state_dict`` wants every rank's state dict (DeepSpeed ZeRO's ``state_dict_list``)."""
    import inspect

    try:
        return "state_dict_list" in inspect.signature(optimizer.load_state_dict).parameters
    except (TypeError, ValueError):
        return False


def _allowed_globals() -> list:
    """Classes DeepSpeed's optimizer state dicts hold (empty when DeepSpeed is not installed)."""
    try:
        from dist8.integrations.deepspeed_convert import deepspeed_safe_globals
    except ImportError:
        return []
    return deepspeed_safe_globals()


def _read_meta(path: Path) -> dict[str, Any]:
    """``train_meta.json`` of a dcp/torch checkpoint, type-checked."""
    meta_path = member(path, _META, str(path))
    try:
        meta = json.loads(read_text(meta_path, limit=1 << 26))
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {str(exc)[:100]}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path} is not a JSON object")
    for key, kind in (("step", int), ("world_size", int), ("extra", dict), ("files", dict)):
        if key == "files" and key not in meta:
            continue  # written before files were recorded
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise CheckpointError(f"{meta_path}: {key} must be {'an integer' if kind is int else 'an object'}")
    if meta["world_size"] < 1 or meta["step"] < 0:
        raise CheckpointError(f"{meta_path}: world_size must be >= 1 and step >= 0")
    for name, info in meta.get("files", {}).items():
        if not _LISTED.fullmatch(name) or not isinstance(info, dict) or type(info.get("size")) is not int \
                or not isinstance(info.get("sha256"), str):
            raise CheckpointError(f"{meta_path}: files entry {name[:80]!r} is malformed")
    return meta


# the files train_meta.json lists: the torch writer's per-rank files, the dcp writer's (DCP names its own)
_LISTED = re.compile(r"rank\d{5}\.pt|dcp/[A-Za-z0-9_][A-Za-z0-9_.-]*|dcp/\.metadata")


def _file_entry(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": sha256_file(file)}


def _verified(path: Path, meta: dict[str, Any], name: str) -> Path:
    """``path/name`` after checking it is a regular file listed in train_meta.json with its size and sha256."""
    *dirs, base = name.split("/")
    parent = path
    for d in dirs:
        parent = member(parent, d, str(path / _META), kind="dir")
    file = member(parent, base, str(path / _META))
    info = meta.get("files", {}).get(name)
    if info is None:
        if "files" in meta:
            raise CheckpointError(f"{file} is not listed in {path / _META} (cannot be verified)")
        return file  # written before files were recorded
    if file.stat().st_size != info["size"]:
        raise CheckpointError(f"{file} has {file.stat().st_size} bytes, {_META} says {info['size']}")
    if sha256_file(file) != info["sha256"]:
        raise CheckpointError(f"{file} fails its sha256 check (corrupt)")
    return file


def _check_own(path: Path) -> None:
    meta = _read_meta(path)
    if meta.get("writer") == "dcp":
        listed = [name for name in meta.get("files", {}) if name.startswith("dcp/")]
        if not listed:  # written before 2026-12-05, when the dcp writer recorded no sizes or sha256
            if not (path / "dcp" / ".metadata").is_file():
                raise CheckpointError(f"{path / 'dcp' / '.metadata'} is missing")
            return
        if "dcp/.metadata" not in listed:
            raise CheckpointError(f"{path / _META} lists no dcp/.metadata")
        for name in listed:
            _verified(path, meta, name)
        return
    for r in range(meta["world_size"]):
        _verified(path, meta, f"rank{r:05d}.pt")


def _check_dist8(path: Path) -> None:
    from dist8.checkpoint import read_metadata, verify_files

    verify_files(path, read_metadata(path))


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _complete_steps(root: Path) -> list[int]:
    steps = []
    for entry in root.iterdir() if root.is_dir() else []:
        m = _STEP_DIR.match(entry.name)
        if m and not entry.is_symlink() and (entry / _META).is_file():
            steps.append(int(m.group(1)))
    return steps
