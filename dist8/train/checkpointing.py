"""Checkpoints of the training job.

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
``.step-N.tmp``; every rank writes; barrier; rank 0 writes ``train_meta.json``
(step, extra), renames the directory into place and rotates old ones. A crash at
any point leaves the previous checkpoint loadable.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Checkpointer"]

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_META = "train_meta.json"


def _dist8_api():
    """``dist8.checkpoint`` if it provides save/load/latest, else None."""
    try:
        import dist8.checkpoint as ckpt
    except ImportError:
        return None
    if all(callable(getattr(ckpt, name, None)) for name in ("save", "load", "latest")):
        return ckpt
    return None


def _is_dist8_optimizer(optimizer: Any) -> bool:
    from dist8.optim import Optimizer8bit

    if isinstance(optimizer, Optimizer8bit):
        return True
    try:
        from dist8.shard import ShardedOptimizer
    except ImportError:
        return False
    return isinstance(optimizer, ShardedOptimizer)


class Checkpointer:
    """Save / find / load the job's checkpoints under one root directory."""

    def __init__(self, root: str, mode: str, model, optimizer, keep_last: int) -> None:
        self.root = root
        self.model = model
        self.optimizer = optimizer
        self.keep_last = keep_last
        if mode == "fsdp2":
            self.kind = "dcp"
        elif _is_dist8_optimizer(optimizer) and _dist8_api() is not None:
            self.kind = "dist8"
        else:
            self.kind = "torch"

    def describe(self) -> str:
        return {"dist8": "dist8.checkpoint", "dcp": "torch.distributed.checkpoint (dist8.integrations.fsdp)",
                "torch": "torch.save per rank"}[self.kind]

    # ---- public -----------------------------------------------------------------
    def save(self, step: int, extra: dict[str, Any]) -> str:
        if self.kind == "dist8":
            return _dist8_api().save(self.root, self.model, self.optimizer, step=step, extra=extra,
                                     keep_last=self.keep_last)
        return self._atomic_save(step, extra)

    def latest(self) -> str | None:
        if not os.path.isdir(self.root):
            return None
        if self.kind == "dist8":
            found = _dist8_api().latest(self.root)
            return None if found is None else os.fspath(found)
        steps = _complete_steps(Path(self.root))
        return os.path.join(self.root, f"step-{max(steps):08d}") if steps else None

    def load(self, path: str) -> dict[str, Any]:
        if self.kind == "dist8":
            return dict(_dist8_api().load(path, self.model, self.optimizer) or {})
        meta = json.loads((Path(path) / _META).read_text())
        if self.kind == "dcp":
            from dist8.integrations import fsdp

            fsdp.load_dcp(os.path.join(path, "dcp"), self.model, self.optimizer)
        else:
            rank, world = _rank_world()
            if meta["world_size"] != world:
                raise RuntimeError(f"checkpoint {path} was saved by {meta['world_size']} ranks, this job has {world}; "
                                   "the per-rank torch.save format cannot reshard (dist8 optimizers use "
                                   "dist8.checkpoint, which can)")
            blob = torch.load(Path(path) / f"rank{rank:05d}.pt", map_location="cpu", weights_only=False)
            self.model.load_state_dict(blob["model"])
            self.optimizer.load_state_dict(blob["optimizer"])
        return dict(meta.get("extra", {}))

    # ---- the atomic directory protocol of the dcp / torch writers -----------------------
    def _atomic_save(self, step: int, extra: dict[str, Any]) -> str:
        rank, world = _rank_world()
        final = Path(self.root) / f"step-{step:08d}"
        tmp = final.with_name(f".{final.name}.tmp")
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier()
        if self.kind == "dcp":
            from dist8.integrations import fsdp

            fsdp.save_dcp(str(tmp / "dcp"), self.model, self.optimizer)
        else:
            blob = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            part = tmp / f"rank{rank:05d}.pt.part"
            torch.save(blob, part)
            os.replace(part, tmp / f"rank{rank:05d}.pt")
        _barrier()
        if rank == 0:
            meta = {"step": step, "world_size": world, "writer": self.kind, "extra": extra}
            (tmp / _META).write_text(json.dumps(meta))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in sorted(_complete_steps(final.parent))[: -self.keep_last]:
                shutil.rmtree(final.parent / f"step-{old:08d}", ignore_errors=True)
        _barrier()
        return str(final)


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
        if m and (entry / _META).is_file():
            steps.append(int(m.group(1)))
    return steps
