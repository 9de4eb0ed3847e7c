"""Expected failures of ``dist8 train`` at run time: one line on stderr naming the file or key, exit code 2.

Covers a corrupt checkpoint on resume, resume paths that hold no checkpoint, data paths
without data, a world-size mismatch of the per-rank torch.save checkpoints, and the same
line (once) from the ranks of ``dist8 train --nproc-per-node`` and of plain torchrun. Also
that resuming a finished run keeps its summary. Config errors: tests/test_train.py.
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from dist8.train.lock import LOCK_NAME
from train_utils import REPO, child_env, launch_cmd, mode_available, run, tiny_sets, torchrun_cmd, train_cmd


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("dist8 train: error: ")]


def _one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 2 and stderr is exactly one error line (notes and kernel build notices aside) containing ``expected``."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith(("dist8: buil", "dist8 train: note: ", "[dist8 train] note: "))]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith("dist8 train: error: "), result.stderr[-3000:]
    assert expected in lines[0], (expected, lines[0])


def _corrupt(checkpoint_dir) -> str:
    """Flip one byte in the middle of the checkpoint's model tensors; returns that file's path."""
    path = checkpoint_dir / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(blob)
    return str(path)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 10-step single-process run with dist8 checkpoints at steps 5 and 10."""
    d = tmp_path_factory.mktemp("finished")
    sets = tiny_sets(d, steps=10, **{"checkpoint.every": 5, "train.eval_every": 5})
    _ok(run(train_cmd(*sets)))
    return d, sets


def test_resuming_a_finished_run_keeps_its_summary(finished_run):
    d, sets = finished_run
    before = json.loads((d / "out" / "summary.json").read_text())
    assert before["final_loss"] is not None and len(before["attempts"]) == 1
    again = run(train_cmd(*sets, "--resume", "auto"))
    _ok(again)
    assert "nothing to train: resumed at step 10" in again.stdout
    after = json.loads((d / "out" / "summary.json").read_text())
    for key in ("final_loss", "final_val_loss", "step", "peak_mem_bytes", "attempts", "wall_s"):
        assert after[key] == before[key], key


@pytest.mark.parametrize("args", [["--set", "optimizer.name=torch.adamw"],
                                  ["--set", "optimizer.name=torch.adamw", "--resume", "auto"],
                                  ["--set", "sharding.mode=fsdp2", "--resume", "auto"]], ids=["baseline", "baseline-resume", "fsdp2-resume"])
def test_a_checkpoint_dir_written_by_another_writer_is_refused_and_kept(finished_run, args):
    """The torch baseline (torch.save per rank) and FSDP2 (DCP) did not see dist8.checkpoint's directories: they
    said "no checkpoint; starting at step 0" and then replaced step-00000010 and rotated step-00000005 away."""
    d, sets = finished_run
    if "sharding.mode=fsdp2" in args and not mode_available("fsdp2"):
        pytest.skip("sharding mode fsdp2 not available with this torch")
    def files():  # the job's directory lock aside (dist8.train.lock: held while a job runs, left in place)
        return {p: p.read_bytes() for p in sorted((d / "ckpt").rglob("*")) if p.is_file() and p.name != LOCK_NAME}

    before = files()
    _one_line(run(train_cmd(*sets, *args)),
              f"{d / 'ckpt' / 'step-00000010'} was written by dist8.checkpoint; this run (")
    assert files() == before


def test_resume_failures_are_one_line(finished_run, tmp_path):
    d, _ = finished_run
    corrupt_root = tmp_path / "corrupt"
    shutil.copytree(d / "ckpt", corrupt_root)
    corrupt_file = _corrupt(corrupt_root / "step-00000010")
    all_corrupt = tmp_path / "all-corrupt"
    shutil.copytree(d / "ckpt", all_corrupt)
    _corrupt(all_corrupt / "step-00000005")
    _corrupt(all_corrupt / "step-00000010")
    (tmp_path / "empty").mkdir()
    (tmp_path / "no-text").mkdir()
    (tmp_path / "no-text" / "a.bin").write_bytes(b"\0" * 10)
    cases = [
        (["--resume", "auto"], {"checkpoint.dir": all_corrupt}, f"{all_corrupt}: no intact checkpoint"),
        (["--resume", str(corrupt_root / "step-00000010")], {}, corrupt_file),
        (["--resume", str(tmp_path / "empty")], {}, "is neither a checkpoint nor a directory holding one"),
        (["--resume", str(tmp_path / "missing")], {}, "is not a checkpoint directory"),
        # loading restores the checkpoint's hyperparameters: a changed one would be ignored without a word
        (["--resume", "auto"], {"checkpoint.dir": d / "ckpt", "optimizer.args.betas": "[0.8, 0.9]"},
         f"config key optimizer.args.betas is [0.8, 0.9] but {d / 'ckpt' / 'step-00000010'} was saved with [0.9, 0.95]"),
        ([], {"data.path": tmp_path / "no-text", "data.glob": "*.txt"}, "config key data.glob: no file under"),
        ([], {"data.path": tmp_path / "no-text", "data.glob": "*.bin"}, "fewer than model.seq_len + 2"),
        ([], {"data.path": tmp_path / "missing.txt"}, "data.path"),
    ]
    procs = []
    for i, (args, overrides, _expected) in enumerate(cases):
        sets = tiny_sets(tmp_path / f"case{i}", steps=12, **{k: str(v) for k, v in overrides.items()})
        procs.append(subprocess.Popen(train_cmd(*sets, *args), cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    for p, (args, overrides, expected) in zip(procs, cases):
        out, err = p.communicate(timeout=300)
        _one_line(subprocess.CompletedProcess(p.args, p.returncode, out, err), expected)


def test_resume_auto_falls_back_past_a_corrupt_newest_checkpoint(finished_run, tmp_path):
    """--resume auto skips a checkpoint that fails its checks, says so, and resumes from the newest intact one."""
    d, _ = finished_run
    root = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", root)
    _corrupt(root / "step-00000010")
    sets = tiny_sets(tmp_path, steps=6, **{"checkpoint.dir": str(root), "checkpoint.every": 100})
    result = run(train_cmd(*sets, "--resume", "auto"))
    _ok(result)
    assert "step-00000010 is not intact" in result.stderr and f"falling back to {root / 'step-00000005'}" in result.stderr
    assert "nothing to train: resumed at step" not in result.stdout  # resumed at 5, trained to 6


def test_rank_failures_are_one_line_with_several_ranks(finished_run, tmp_path):
    """The ranks of `dist8 train --nproc-per-node 2` both fail on a corrupt checkpoint: one line, exit 2."""
    d, _ = finished_run
    root = tmp_path / "ckpt"
    shutil.copytree(d / "ckpt", root)
    corrupt_file = _corrupt(root / "step-00000010")
    sets = tiny_sets(tmp_path, steps=12, **{"checkpoint.dir": str(root)})
    _one_line(run(launch_cmd(*sets, "--resume", str(root / "step-00000010"))), corrupt_file)
    # a config error is caught in the parent, before any rank starts
    _one_line(run(launch_cmd(*sets, "--set", "train.stepz=1")), "unknown config key train.stepz")


def test_torch_baseline_under_launcher_and_world_size_mismatch(tmp_path):
    """The fp32 baseline on 2 ranks (per-rank torch.save checkpoints) resumed on 1: one line naming the mismatch,
    from a plain process and from a rank under plain torchrun (whose own report follows it)."""
    sets = tiny_sets(tmp_path, steps=4, **{"optimizer.name": "torch.adamw", "checkpoint.every": 4,
                                           "train.eval_every": 4})
    first = run(launch_cmd(*sets))
    _ok(first)
    assert "dist8 train: note: sharding.mode dist8-zero2 shards dist8 optimizers only" in first.stderr
    assert "world size            2" in first.stdout
    more = [*sets, "--set", "train.steps=8", "--resume", "auto"]
    _one_line(run(train_cmd(*more)), "saved by 2 ranks, this job has 1")
    under_torchrun = run(torchrun_cmd(*more, nproc=1))
    assert under_torchrun.returncode != 0
    lines = _error_lines(under_torchrun.stderr)
    assert len(lines) == 1 and "saved by 2 ranks, this job has 1" in lines[0], under_torchrun.stderr[-3000:]


def test_deepspeed_checkpoint_at_another_world_size_says_how_many_ranks(tmp_path):
    if not mode_available("deepspeed"):
        pytest.skip("sharding mode deepspeed not available (the [deepspeed] extra)")
    sets = tiny_sets(tmp_path, steps=2, **{"sharding.mode": "deepspeed", "checkpoint.every": 2, "train.eval_every": 2})
    _ok(run(launch_cmd(*sets)))
    _one_line(run(train_cmd(*sets, "--set", "train.steps=4", "--resume", "auto")),
              "was saved by 2 ranks, this job has 1; the per-rank torch.save format cannot reshard (resume with 2 "
              "ranks (each file holds its rank's DeepSpeed ZeRO partition))")


def test_diverged_loss_is_one_line_exit_2(tmp_path):
    """A loss that becomes NaN (lr 1e30) stops the job with one line naming the step, not a traceback."""
    result = run(train_cmd(*tiny_sets(tmp_path, steps=6, **{"train.lr": "1e30", "train.warmup_steps": 0,
                                                            "train.clip": 0, "checkpoint.dir": "null"})))
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert _error_lines(result.stderr) == ["dist8 train: error: loss is nan at step 2; stopping (lower train.lr?)"], \
        result.stderr[-3000:]


def test_fsdp2_checkpoints_are_verified_and_their_metadata_runs_nothing(tmp_path):
    """The dcp writer recorded no file sizes or sha256: 64 flipped bytes in a .distcp resumed with exit 0
    and moments 8e34 off. A crafted .metadata naming os.system through DCP's metadata module ran a shell
    command at `--resume` (found by an outside probe). Both are one line naming the file now."""
    import hashlib

    if not mode_available("fsdp2"):
        pytest.skip("sharding mode fsdp2 not available with this torch")
    sets = tiny_sets(tmp_path, steps=2, **{"sharding.mode": "fsdp2", "checkpoint.every": 2, "train.eval_every": 2})
    _ok(run(train_cmd(*sets)))
    step = tmp_path / "ckpt" / "step-00000002"
    meta = json.loads((step / "train_meta.json").read_text())
    assert "dcp/.metadata" in meta["files"] and any(n.endswith(".distcp") for n in meta["files"]), meta["files"]
    cases = {}
    flipped = tmp_path / "flipped"
    shutil.copytree(step, flipped)
    data = next((flipped / "dcp").glob("*.distcp"))
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    data.write_bytes(bytes(blob))
    cases[flipped] = f"{data} fails its sha256 check (corrupt)"
    crafted = tmp_path / "crafted"  # a crafted checkpoint lists its own sizes and sha256
    shutil.copytree(step, crafted)
    marker = tmp_path / "pwned"
    module, name, arg = "torch.distributed.checkpoint.metadata", "os.system", f"touch {marker}"
    payload = b"\x80\x04" + b"".join(b"\x8c" + bytes([len(t)]) + t.encode() + b"\x94" for t in (module, name)) \
        + b"\x93" + b"\x8c" + bytes([len(arg)]) + arg.encode() + b"\x94\x85R."
    (crafted / "dcp" / ".metadata").write_bytes(payload)
    crafted_meta = json.loads((crafted / "train_meta.json").read_text())
    crafted_meta["files"]["dcp/.metadata"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (crafted / "train_meta.json").write_text(json.dumps(crafted_meta))
    cases[crafted] = f"global {module}.{name} is not allowed in DCP metadata"
    for path, expected in cases.items():
        _one_line(run(train_cmd(*sets, "--set", "train.steps=3", "--resume", str(path))), expected)
    assert not marker.exists()


@pytest.mark.parametrize("args, expected", [
    (["--stop-at", "-5"], "--stop-at must be a step >= 0, got -5"),  # trained nothing, replaced the run's metrics
    (["--nproc-per-node", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),  # 18-line traceback
    (["--nproc-per-node", "100000"], "--nproc-per-node 100000 is more ranks than this machine runs"),  # out of memory
], ids=["stop-at", "max-restarts", "nproc"])
def test_launch_arguments_out_of_range_are_one_line(tmp_path, args, expected):
    _one_line(run(train_cmd(*tiny_sets(tmp_path), *args), timeout=120), expected)
    assert not (tmp_path / "out").exists()
