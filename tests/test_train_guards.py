"""What stops ``dist8 train`` instead of letting a run fail late or silently (dist8.train.guards).

- A step whose gradients are inf/NaN changes no parameter (the job skips it when the global
  norm is not finite; under gradient release the optimizer skips every block holding one), is
  announced and counted in the metrics and the summary; the run goes on.
- Gradients inf/NaN in more than ``train.max_nonfinite_steps`` consecutive steps stop the run
  with one line, on every rank alike even when only one rank's loss made them NaN. Before,
  the dist8 optimizer skipped them and the run trained nothing to its end with a finite loss.
- A model or batch that cannot fit in memory is refused naming the keys, before allocating.

NaN gradients come from the test-only ``train.fault_nan_grad_step`` (dist8.train.faults).
"""
from __future__ import annotations

import contextlib

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from dist8.train.config import ConfigError, load_config
from dist8.train.guards import check_fits
from dist8.train.model import GPT, GPTConfig
from dist8.train.report import read_metrics
from dist_utils import run_ranks
from train_utils import REPO, fault_env, launch_cmd, mode_available, run, tiny_sets, train_cmd


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return [line for line in result.stderr.splitlines() if line.startswith("dist8 train: error: ")]


def _weights(step_dir) -> dict[str, torch.Tensor]:
    if (step_dir / "model.safetensors").is_file():  # dist8's checkpoint
        return load_file(step_dir / "model.safetensors")
    return torch.load(step_dir / "rank00000.pt", weights_only=True)["model"]  # the torch baseline's


RUNS = {
    "AdamW8bit": [],
    "torch.adamw": ["--set", "optimizer.name=torch.adamw"],
    "bf16-24bit-release": ["--config", str(REPO / "configs" / "tiny-gpt-bf16-release.yaml"), "--set", "train.clip=0"],
}


@pytest.mark.parametrize("name", list(RUNS))
def test_a_step_with_nan_gradients_changes_no_parameter_and_is_counted(tmp_path, name):
    sets = tiny_sets(tmp_path, steps=4, **{"checkpoint.every": 1, "checkpoint.keep": 4, "sharding.mode": "ddp",
                                           "train.fault_nan_grad_step": 3, "train.fault_rank": 0})
    result = run(train_cmd(*RUNS[name], *sets), env=fault_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 3: gradients hold inf/NaN" in result.stdout
    weights = {s: _weights(tmp_path / "ckpt" / f"step-0000000{s}") for s in (1, 2, 3, 4)}
    moved = lambda a, b: [k for k in weights[a] if not torch.equal(weights[a][k], weights[b][k])]  # noqa: E731
    if name.endswith("release"):
        # Stepped inside backward, block by block: the blocks holding NaN are skipped, while token-embedding
        # rows absent from the batch have a finite (zero) gradient everywhere and step as on any other step.
        assert moved(2, 3) in ([], ["tok.weight"]), moved(2, 3)
    else:
        assert moved(2, 3) == [], "the skipped step changed parameters"
    assert len(moved(1, 2)) == len(moved(3, 4)) == len(weights[1]), "the other steps train every parameter"
    records = {r["step"]: r for r in read_metrics(tmp_path / "out" / "metrics.jsonl")}
    assert records[3]["nonfinite_steps"] == 1 and records[3]["grad_norm"] is None
    assert sum(r["nonfinite_steps"] for r in records.values()) == 1
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["nonfinite_steps"] == 1 and summary["step"] == 4


@pytest.mark.parametrize("mode", ["dist8-zero2", "fsdp2", "deepspeed"])
def test_nan_gradients_on_one_rank_for_too_long_stop_every_rank_in_one_line(tmp_path, mode):
    if not mode_available(mode):
        pytest.skip(f"sharding mode {mode} not available here (its package, or torch too old)")
    sets = tiny_sets(tmp_path, steps=20, **{"sharding.mode": mode, "checkpoint.dir": "null",
                                            "train.fault_nan_grad_step": 2, "train.fault_nan_grad_count": 100,
                                            "train.fault_rank": 1, "train.max_nonfinite_steps": 2})
    result = run(launch_cmd(*sets), timeout=300, env=fault_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert _error_lines(result) == [
        "dist8 train: error: gradients held inf/NaN in 3 consecutive steps (the last at step 4), more than "
        "train.max_nonfinite_steps=2; stopping (lower train.lr? check the data and the model)"], result.stderr[-3000:]


def _train_where_one_rank_cannot_read_the_data(rank, world_size, tmp):
    import faulthandler
    from pathlib import Path

    import dist8.train.trainer as tr

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    if rank == 1:  # this node's disk lacks the corpus
        def unreadable(cfg, seq_len):
            raise ConfigError(f"config key data.path: cannot read {cfg.path!r}: No such file or directory")
        tr.load_corpus = unreadable
    sets = tiny_sets(Path(tmp), steps=2, **{"checkpoint.dir": "null"})
    cfg = load_config(None, [kv for kv in sets if kv != "--set"])
    try:
        with contextlib.ExitStack() as held:  # rank 0's directory locks
            tr._train(cfg, None, None, "run", rank, world_size, torch.device("cpu"), held)
    except ConfigError as exc:
        return str(exc)
    return None


def test_data_one_rank_cannot_read_is_refused_on_every_rank_before_the_first_collective(tmp_path):
    """The data were read and the model sized per rank before the first collective (the model's broadcast):
    a rank that alone could not read them (another node's disk) raised, and the others waited in the
    broadcast forever under launchers other than torchrun (whose agent tears the job down). Every rank
    refuses now, the others naming the rank."""
    said = run_ranks(_train_where_one_rank_cannot_read_the_data, 2, str(tmp_path), tmp_path=tmp_path)
    assert said[1].startswith("config key data.path: cannot read"), said
    assert said[0].startswith("reading the data, sizing the model and creating output.dir failed on rank 1: "
                              "config key data.path"), said


def test_model_and_batch_sizes_beyond_memory_are_refused_naming_the_keys():
    cfg = load_config(None, ["model.n_layer=100000", "model.d_model=8192", "model.n_head=8"])
    gpt = GPTConfig(n_layer=100000, d_model=8192, n_head=8)
    with pytest.raises(ConfigError, match=r"config keys model.n_layer=100000, model.d_model=8192: the model's "
                                          r"80,\d{3},\d{3},\d{3},\d{3} parameters alone need [\d,.]+ GiB per rank"):
        check_fits(cfg, gpt, torch.device("cpu"), world=1)
    cfg = load_config(None, ["train.batch_size=1000000000"])
    with pytest.raises(ConfigError, match="config keys train.batch_size=1000000000, model.seq_len=128: one batch's logits"):
        check_fits(cfg, GPTConfig(), torch.device("cpu"), world=1)
    check_fits(load_config(None), GPTConfig(), torch.device("cpu"), world=1)  # the default fits


@pytest.mark.parametrize("kw", [dict(), dict(n_layer=3, d_model=48, n_head=3, seq_len=17, stable_embedding=True)])
def test_parameter_count_without_building_the_model(kw):
    assert GPTConfig(**kw).num_params() == GPT(GPTConfig(**kw)).num_params()
