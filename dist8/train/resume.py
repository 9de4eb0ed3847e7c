"""Where the training job resumes from: ``--resume auto|PATH`` resolved on rank 0 and handed to every rank,
and a fresh run into a ``checkpoint.dir`` that holds an earlier run's checkpoints refused."""
from __future__ import annotations

import os
from collections.abc import Callable

from dist8.shard.agreement import rank_0_answer
from dist8.train.checkpointing import Checkpointer
from dist8.train.config import ConfigError

__all__ = ["resume_path"]


def resume_path(ckpt: Checkpointer | None, resume: str | None,
                make: Callable[[str], Checkpointer]) -> tuple[str | None, Checkpointer | None]:
    """The checkpoint to resume from: auto -> newest under checkpoint.dir; a root -> its newest. A fresh run
    (no --resume) into a checkpoint.dir holding this writer's checkpoints is refused: it saved beside them,
    checkpoint.keep rotated its own lower steps away at once, and --resume auto later continued the earlier
    run, silently."""
    if resume is None:
        earlier = ckpt.newest_present() if ckpt is not None else None
        if earlier is not None:
            raise ConfigError(f"config key checkpoint.dir: {ckpt.root} holds an earlier run's checkpoints (newest "
                              f"{os.path.basename(earlier)}); a fresh run would save beside them and "
                              "checkpoint.keep would rotate its own away: pass --resume auto to continue that run, "
                              "or use another checkpoint.dir (or remove them)")
        return None, ckpt
    if resume == "auto":
        return ckpt.latest(), ckpt
    # rank 0's view on every rank: a rank whose disk said otherwise took the other branch, whose latest()
    # is collective, and waited there forever
    marks = ("metadata.json", "train_meta.json")
    if rank_0_answer(lambda: any(os.path.isfile(os.path.join(resume, f)) for f in marks)):
        return resume, ckpt or make(os.path.dirname(os.path.abspath(resume)))
    root = make(resume)  # a checkpoint root: follow its newest complete checkpoint
    found = root.latest()
    if found is None:
        raise ConfigError(f"--resume: {resume!r} is neither a checkpoint nor a directory holding one")
    return found, ckpt or root
