"""Fault tolerance of ``dist8 train``: a rank killed under ``torchrun --max-restarts``, and SIGTERM.

Run time on a 2-core CPU machine: about 1 minute for this file.
"""
from __future__ import annotations

import signal
import subprocess
import time

import pytest

from train_utils import REPO, assert_trained, child_env, fault_env, run, tiny_sets, torchrun_cmd, train_cmd
from dist8.train.config import ConfigError, load_config
from dist8.train.report import read_metrics


def _mode() -> str:
    """The job's sharded mode when dist8.shard is importable, else plain DDP."""
    from dist8.train.engine import check_mode_available

    try:
        check_mode_available(load_config(None, ["sharding.mode=dist8-zero2"]))
        return "dist8-zero2"
    except ConfigError:
        return "ddp"


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def _losses(records):
    return [(r["step"], r["loss"], r["val_loss"], r["lr"], r["grad_norm"]) for r in records]


def test_killed_rank_restarts_resumes_and_matches(tmp_path):
    """Rank 1 SIGKILLs itself at step 25 (first attempt only); torchrun restarts the job,
    which resumes from the step-20 checkpoint and finishes with the uninterrupted run's losses."""
    mode = _mode()
    ref = tmp_path / "ref"
    _ok(run(torchrun_cmd(*tiny_sets(ref, **{"sharding.mode": mode}))))
    faulty = tmp_path / "faulty"
    sets = tiny_sets(faulty, **{"sharding.mode": mode, "train.fault_kill_step": 25, "train.fault_rank": 1})
    result = run(torchrun_cmd(*sets, "--resume", "auto", extra=["--max-restarts=1"]), env=fault_env())
    _ok(result)
    assert "fault injection: rank 1 SIGKILLs itself at step 25" in result.stderr
    assert "resumed from" in result.stdout and "at step 20" in result.stdout
    got, want = read_metrics(faulty / "out" / "metrics.jsonl"), read_metrics(ref / "out" / "metrics.jsonl")
    assert_trained(want)
    assert got[-1]["step"] == 40
    assert got[-1]["loss"] == want[-1]["loss"]
    assert _losses(got) == _losses(want)


def test_sigterm_saves_a_final_checkpoint(tmp_path):
    """SIGTERM mid-run: the job finishes its step, checkpoints it, exits 143; --resume auto continues from it."""
    sets = tiny_sets(tmp_path, steps=100_000, **{"checkpoint.every": 0, "train.eval_every": 0})
    proc = subprocess.Popen(train_cmd(*sets), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(metrics)) < 5:
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "Traceback" not in err
    stopped = read_metrics(metrics)[-1]["step"]
    assert f"SIGTERM: stopped at step {stopped}" in out
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == [f"step-{stopped:08d}"]
    resumed = run(train_cmd(*sets, "--resume", "auto", "--stop-at", str(stopped + 3)))
    _ok(resumed)
    assert f"at step {stopped}" in resumed.stdout
    assert [r["step"] for r in read_metrics(metrics)][-4:] == [stopped, stopped + 1, stopped + 2, stopped + 3]


@pytest.mark.parametrize("torch_before_2_8,finished,backend,expected", [
    (True, True, "gloo", ["barrier", "sleep", "destroy"]),
    (True, False, "gloo", ["destroy"]),  # a rank leaving on an error must not wait for the others
    (True, True, "nccl", ["destroy"]),
    (False, True, "gloo", ["destroy"]),
])
def test_a_finished_run_drains_gloo_before_leaving_on_torch_before_2_8(monkeypatch, torch_before_2_8, finished,
                                                                      backend, expected):
    """torch < 2.8 destroys a gloo group holding the GIL while a worker may still need it to release a
    finished collective's tensors: the rank hung at exit (on torch 2.6, 3 of the suite's training
    launches; a bare 2-rank script 11 of 25 times, 0 of 40 with the drain). Only the decision is
    testable on the torch CI runs (2.13, fixed there); README's "Which torch" has the 2.6 runs."""
    import torch.distributed as dist

    from dist8.train import trainer

    calls = []
    monkeypatch.setattr(trainer, "GLOO_EXIT_NEEDS_DRAIN", torch_before_2_8)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_backend", lambda: backend)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(trainer.time, "sleep", lambda seconds: calls.append("sleep"))
    trainer.leave_process_group(finished)
    assert calls == expected


def test_the_drain_applies_to_torch_before_2_8_only():
    from dist8.version import major_minor

    assert [major_minor(v) < (2, 8) for v in ("2.6.0+cu124", "2.7.1", "2.8.0a0+gitabc", "2.8.0", "2.13.0+cpu")] == \
        [True, True, False, False, False]
