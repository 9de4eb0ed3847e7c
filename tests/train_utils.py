"""Helpers for the training job's tests (subprocess torchrun runs on CPU with gloo)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from dist_utils import free_port

__all__ = ["REPO", "child_env", "fault_env", "free_port", "launch_cmd", "mode_available", "run", "tiny_sets",
           "torchrun_cmd", "train_cmd"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny-gpt.yaml"


def child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", TQDM_DISABLE="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.pop("LOCAL_RANK", None)
    env.update(extra)
    return env


def fault_env(**extra: str) -> dict[str, str]:
    """:func:`child_env` for runs that use the test-only ``train.fault_*`` keys (refused without it)."""
    from dist8.train.config import FAULTS_ENV

    return child_env(**{FAULTS_ENV: "1"}, **extra)


def mode_available(mode: str) -> bool:
    """Whether ``sharding.mode`` ``mode`` can run here (its package installed, torch new enough)."""
    from dist8.train.config import ConfigError, load_config
    from dist8.train.engine import check_mode_available

    try:
        check_mode_available(load_config(DEFAULT_CONFIG, [f"sharding.mode={mode}"]))
    except ConfigError:
        return False
    return True


def tiny_sets(tmp: Path, steps: int = 40, **overrides) -> list[str]:
    """``--set`` arguments of a few-second run writing into ``tmp``."""
    values = {
        "model.n_layer": 1,
        "model.d_model": 64,
        "model.n_head": 4,
        "model.seq_len": 64,
        "data.max_bytes": 400_000,
        "train.steps": steps,
        "train.batch_size": 8,
        "train.warmup_steps": 5,
        "train.eval_every": 20,
        "train.eval_batches": 2,
        "train.log_every": 1,
        "checkpoint.dir": str(tmp / "ckpt"),
        "checkpoint.every": 10,
        "output.dir": str(tmp / "out"),
        "output.plot": False,
    }
    values.update(overrides)
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist8.train", "--config", str(DEFAULT_CONFIG), *args]


def launch_cmd(*args: str, nproc: int = 2) -> list[str]:
    """``dist8 train --nproc-per-node N`` (the README's multi-rank command)."""
    return [sys.executable, "-m", "dist8", "train", "--nproc-per-node", str(nproc), "--config", str(DEFAULT_CONFIG),
            *args]


def torchrun_cmd(*args: str, nproc: int = 2, port: int | None = None, extra: list[str] | None = None) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        f"--master_port={port or free_port()}", *(extra or []),
        "-m", "dist8.train", "--config", str(DEFAULT_CONFIG), *args,
    ]


def run(cmd: list[str], timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=kw.pop("env", child_env()), capture_output=True, text=True,
                          timeout=timeout, **kw)


def assert_trained(records: list[dict], by: float = 0.5) -> None:
    """The run's training loss fell by at least ``by`` (nats) from its first step to its last: an
    equality between two runs says nothing when neither trained (an optimizer stepping buffers the
    model no longer views left both runs at the initial model, 2026-12-02)."""
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - by, f"the run did not train: loss {first:.3f} at step {records[0]['step']}, " \
                              f"{last:.3f} at step {records[-1]['step']}"
