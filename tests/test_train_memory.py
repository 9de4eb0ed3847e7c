"""The training job's fewest-bytes options (issue 19): model.dtype, train.gradient_release,
optimizer.args.master_weight_bits, and the per-rank memory breakdown in metrics and plot."""
from __future__ import annotations

import json
import sys

import pytest
import torch
from torch import nn

from train_utils import REPO, assert_trained, run, tiny_sets
from dist8.train.config import ConfigError, load_config
from dist8.train.report import read_metrics

RELEASE_CONFIG = REPO / "configs" / "tiny-gpt-bf16-release.yaml"

REFUSALS = [  # (--set overrides on the release config, words the one-line error must hold)
    (["train.grad_accum=2"], "config key train.grad_accum=2 is incompatible with train.gradient_release"),
    (["train.clip=1.0"], "config key train.clip=1.0 (a global gradient-norm clip) is incompatible"),
    (["model.dtype=fp16"], "config key model.dtype=fp16 needs loss scaling (GradScaler)"),
    (["sharding.mode=deepspeed"], "config key sharding.mode=deepspeed is incompatible with train.gradient_release"),
    (["sharding.mode=dist8-zero2"], "config key sharding.mode=dist8-zero2 is incompatible"),
    (["sharding.mode=dist8-zero1"], "config key sharding.mode=dist8-zero1 is incompatible"),
    (["optimizer.name=torch.adamw", "optimizer.args={}"], "config key optimizer.name=torch.adamw is incompatible"),
    (["model.dtype=fp64"], "config key model.dtype must be one of fp32, bf16, fp16; got 'fp64'"),
    (["sharding.mode=fsdp2"], "config key train.weight_grad_chunk is incompatible with sharding.mode fsdp2"),
    (["train.weight_grad_chunk=0"], "config key train.weight_grad_chunk must be a number of elements > 0 or null"),
    (["train.gradient_release=false"], "config key train.weight_grad_chunk needs train.gradient_release: true"),
    (["optimizer.name=LAMB8bit"], "config key train.weight_grad_chunk is incompatible with optimizer.name=LAMB8bit"),
    (["optimizer.args.on_nonfinite=skip_param"], "incompatible with optimizer.args.on_nonfinite=skip_param"),
    (["optimizer.args.on_nonfinite=raise", "train.weight_grad_chunk=null"],
     "config key optimizer.args.on_nonfinite=raise is incompatible with train.gradient_release"),
]


@pytest.mark.parametrize("sets,expected", REFUSALS, ids=[s[0] for s, _ in REFUSALS])
def test_gradient_release_refusals_are_one_line(sets, expected):
    with pytest.raises(ConfigError) as info:
        load_config(RELEASE_CONFIG, sets)
    msg = str(info.value)
    assert "\n" not in msg and expected in msg, msg


def test_master_weight_bits_is_checked_by_the_optimizer_with_the_model_dtype():
    cfg = load_config(RELEASE_CONFIG)
    assert cfg.model.dtype == "bf16" and cfg.train.gradient_release and cfg.optimizer.args["master_weight_bits"] == 24
    with pytest.raises(ConfigError, match=r"optimizer.args is not valid for AdamW8bit: master_weight_bits=24 needs"):
        load_config(RELEASE_CONFIG, ["model.dtype=fp32"])  # fp32 parameters are their own master
    with pytest.raises(ConfigError, match="master_weight_bits must be None, 24 or 32"):
        load_config(RELEASE_CONFIG, ["optimizer.args.master_weight_bits=16"])
    # the fp32 torch baseline drops it like any other dist8-only argument
    from dist8.train.config import fit_to_optimizer

    base = load_config(REPO / "configs" / "tiny-gpt.yaml", ["optimizer.name=torch.adamw",
                                                            "optimizer.args.master_weight_bits=24"])
    assert any("master_weight_bits" in note for note in fit_to_optimizer(base))


def test_memory_breakdown_counts_tensors():
    import dist8
    from dist8.train.memory import memory_breakdown

    torch.manual_seed(0)
    model = dist8.cast_model(nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64)), torch.bfloat16)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=1, master_weight_bits=24)
    model(torch.randn(2, 64, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    mem = memory_breakdown(model, opt)
    n_half, n_fp32 = 64 * 64 + 64, 2 * 64
    assert mem["params"] == 2 * n_half + 4 * n_fp32
    assert mem["grads"] == mem["params"]
    assert mem["correction"] == n_half  # int8, bf16 parameters only (LayerNorm stays fp32, its own master)
    assert mem["master"] == 0
    assert mem["optimizer_state"] == opt.state_nbytes() - n_half
    assert mem["fp32_adamw"] == 16 * (n_half + n_fp32)
    assert memory_breakdown(model, opt, gradient_release=True)["grads"] == 2 * 64 * 64  # the largest parameter


def _release_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "dist8.train", "--config", str(RELEASE_CONFIG), *args]


def test_release_config_trains_and_resumes_exactly(tmp_path):
    """configs/tiny-gpt-bf16-release.yaml at tiny size: trains, plots the breakdown, resumes bitwise."""
    full = tmp_path / "full"
    result = run(_release_cmd(*tiny_sets(full, steps=20, **{"output.plot": True, "train.eval_every": 10,
                                                            "train.weight_grad_chunk": 4096})))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gradient release" in result.stdout
    records = read_metrics(full / "out" / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 21))
    assert_trained(records)  # (a val loss below the first step's loss held without training too)
    assert all(r["grad_norm"] is None for r in records)  # released: nothing left to measure
    mem = records[-1]["memory_bytes_per_rank"]
    summary = json.loads((full / "out" / "summary.json").read_text())
    n = summary["params"]
    assert summary["memory_bytes_per_rank"] == mem
    assert 0 < mem["correction"] < n  # one int8 per bf16 weight (norms and their fp32 state excluded)
    assert mem["grads"] < mem["params"] / 4  # one parameter's gradient at a time
    assert mem["params"] < 2.1 * n and mem["fp32_adamw"] == 16 * n
    assert (full / "out" / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Stop at 10 (checkpoint with bf16 params + correction), resume: the same curve bit for bit.
    part = tmp_path / "part"
    sets = tiny_sets(part, steps=20, **{"train.eval_every": 10, "train.weight_grad_chunk": 4096})
    first = run(_release_cmd(*sets, "--stop-at", "10"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run(_release_cmd(*sets, "--resume", "auto"))
    assert second.returncode == 0, second.stderr[-4000:]
    assert "at step 10" in second.stdout
    losses = [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(part / "out" / "metrics.jsonl")]
    assert losses == [(r["step"], r["loss"], r["val_loss"]) for r in records]


def test_release_config_on_fsdp2_two_ranks_resumes_exactly(tmp_path):
    """The same config under FSDP2 on 2 ranks (bf16 local shards + their corrections, DCP checkpoints)."""
    from train_utils import torchrun_cmd

    def cmd(d, *extra):
        args = torchrun_cmd(*tiny_sets(d, steps=10, **{"sharding.mode": "fsdp2", "train.eval_every": 5,
                                                       "checkpoint.every": 5, "train.weight_grad_chunk": "null"}),
                            *extra)
        return [a if a != str(REPO / "configs" / "tiny-gpt.yaml") else str(RELEASE_CONFIG) for a in args]

    full = run(cmd(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-4000:]
    assert "FSDP2 x2 + gradient release" in full.stdout
    first = run(cmd(tmp_path / "part", "--stop-at", "5"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run(cmd(tmp_path / "part", "--resume", "auto"))
    assert second.returncode == 0, second.stderr[-4000:]
    records = read_metrics(tmp_path / "full" / "out" / "metrics.jsonl")
    assert records[-1]["memory_bytes_per_rank"]["correction"] > 0
    assert [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(tmp_path / "part" / "out" / "metrics.jsonl")] \
        == [(r["step"], r["loss"], r["val_loss"]) for r in records]


def test_bf16_master24_on_dist8_zero2_two_ranks_resumes_exactly(tmp_path):
    """model.dtype bf16 (LayerNorms stay fp32) + master_weight_bits 24 under ShardedOptimizer stage 2 on 2 ranks:
    one flat buffer per dtype; the corrections and the fp32 norms' state are partitioned, checkpointed and
    resumed bit for bit (the job used to stop with a traceback: one parameter dtype only)."""
    from train_utils import torchrun_cmd

    def cmd(d, *extra):
        args = torchrun_cmd(*tiny_sets(d, steps=10, **{"sharding.mode": "dist8-zero2", "train.gradient_release": False,
                                                       "train.weight_grad_chunk": "null", "train.eval_every": 5,
                                                       "checkpoint.every": 5}), *extra)
        return [a if a != str(REPO / "configs" / "tiny-gpt.yaml") else str(RELEASE_CONFIG) for a in args]

    full = run(cmd(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-4000:]
    assert "dist8 ZeRO-2 x2" in full.stdout
    first = run(cmd(tmp_path / "part", "--stop-at", "5"))
    assert first.returncode == 0, first.stderr[-4000:]
    second = run(cmd(tmp_path / "part", "--resume", "auto"))
    assert second.returncode == 0, second.stderr[-4000:]
    records = read_metrics(tmp_path / "full" / "out" / "metrics.jsonl")
    mem = records[-1]["memory_bytes_per_rank"]
    assert mem["correction"] > 0 and mem["master"] == 0 and mem["grads"] > 0
    assert [(r["step"], r["loss"], r["val_loss"]) for r in read_metrics(tmp_path / "part" / "out" / "metrics.jsonl")] \
        == [(r["step"], r["loss"], r["val_loss"]) for r in records]
