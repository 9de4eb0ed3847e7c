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


def _wait_for_records(proc, metrics, n=5):
    deadline = time.time() + 300
    while time.time() < deadline and len(read_metrics(metrics)) < n:
        if proc.poll() is not None:
            pytest.fail(f"run ended early: {proc.communicate()}")
        time.sleep(0.2)


@pytest.mark.parametrize("how", ["SIGKILL of the launcher", "SIGINT to the launcher"])
def test_the_ranks_checkpoint_and_stop_when_the_launcher_dies_or_is_interrupted(tmp_path, how):
    """`dist8 train --nproc-per-node 2`: a SIGKILL of the launcher left both ranks training on (torchrun gives
    them their own session), writing the directories a `--resume auto` then wrote too; a SIGINT (Ctrl-C)
    stopped them mid-step with ~90 lines of tracebacks and no checkpoint (found by an outside probe). Now the
    ranks checkpoint and stop as on SIGTERM, and a resume continues from that checkpoint."""
    from train_utils import launch_cmd

    sets = tiny_sets(tmp_path, steps=100_000, **{"checkpoint.every": 0, "train.eval_every": 0})
    proc = subprocess.Popen(launch_cmd(*sets), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_records(proc, tmp_path / "out" / "metrics.jsonl")
    proc.send_signal(signal.SIGKILL if "KILL" in how else signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    deadline = time.time() + 120  # the ranks outlive a SIGKILLed launcher by their last step and save
    while time.time() < deadline and not list((tmp_path / "ckpt").glob("step-*")):
        time.sleep(0.5)
    lock = tmp_path / "out" / ".dist8-train.lock"
    import fcntl
    import os

    fd = os.open(lock, os.O_RDWR)
    try:
        for _ in range(240):  # rank 0 holds the output lock until it has left
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.5)
        else:
            pytest.fail("the ranks are still running after their launcher died")
    finally:
        os.close(fd)
    saved = sorted(p.name for p in (tmp_path / "ckpt").glob("step-*"))
    assert len(saved) == 1, saved
    if "INT" in how:
        assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
    stopped = int(saved[0].split("-")[1])
    resumed = run(launch_cmd(*sets, "--resume", "auto", "--stop-at", str(stopped + 2)))
    _ok(resumed)
    assert f"at step {stopped}" in resumed.stdout


def test_the_launcher_names_the_rank_that_failed_first(tmp_path):
    """A SIGKILLed rank 1 was reported as "rank 0 exited with code -15": torchrun's stopping of the others."""
    from train_utils import launch_cmd

    sets = tiny_sets(tmp_path, steps=100_000, **{"checkpoint.every": 0, "train.eval_every": 0,
                                                 "train.fault_kill_step": 8, "train.fault_rank": 1})
    result = run(launch_cmd(*sets), env=fault_env())
    assert result.returncode == 1
    assert "dist8 train: error: rank 1 killed by SIGKILL (its output is above)" in result.stderr, result.stderr[-3000:]


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
