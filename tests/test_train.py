"""End-to-end tests of ``dist8 train`` (multi-process on CPU with gloo via torchrun).

Run times on a 2-core CPU machine: about 3 minutes for this file.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from train_utils import (REPO, assert_trained, child_env, free_port, launch_cmd, mode_available, run, tiny_sets,
                         torchrun_cmd, train_cmd)
from dist8.train.config import ConfigError, load_config
from dist8.train.report import read_metrics

# The default config (configs/tiny-gpt.yaml: 2 layers, d_model 128, AdamW8bit, 2 ranks) shortened to
# 150 steps reaches a validation loss of about 2.41 nats/byte (measured: 2.4074 with ddp and with
# dist8-zero2; a uniform byte model has ln 256 = 5.55, a unigram model of Python source about 3.1).
VAL_LOSS_THRESHOLD = 2.6
SHARDED_MODES = ["ddp", "dist8-zero2", "fsdp2", "deepspeed"]  # deepspeed: ZeRO-2 (configs/deepspeed-zero2.json)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-5000:]}"


def _losses(records: list[dict]) -> list[tuple]:
    return [(r["step"], r["loss"], r["val_loss"], r["lr"], r["grad_norm"]) for r in records]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 40-step tiny runs, one per mode (computed on first use)."""
    cache: dict[str, list[dict]] = {}

    def get(mode: str) -> list[dict]:
        if mode not in cache:
            d = tmp_path_factory.mktemp(f"ref-{mode}")
            _ok(run(torchrun_cmd(*tiny_sets(d, **{"sharding.mode": mode}))))
            cache[mode] = read_metrics(d / "out" / "metrics.jsonl")
            assert_trained(cache[mode])  # what the runs compared with it must match is a trained model
            assert [r["step"] for r in cache[mode]] == list(range(1, 41))
        return cache[mode]

    return get


def test_default_config_trains_on_two_ranks(tmp_path):
    """The README's main job (`dist8 train --nproc-per-node 2`, default config), shortened to 150 steps."""
    result = run(launch_cmd("--set", "train.steps=150", "--set", "train.eval_every=50",
                              "--set", f"output.dir={tmp_path / 'out'}", "--set", f"checkpoint.dir={tmp_path / 'ckpt'}"),
                 timeout=800)
    _ok(result)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    evals = [r["val_loss"] for r in records if r["val_loss"] is not None]
    assert len(evals) == 3
    assert evals[-1] < VAL_LOSS_THRESHOLD, evals
    assert evals[0] > evals[-1]
    last = records[-1]
    assert last["step"] == 150
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "opt_state_bytes_per_rank", "peak_mem_bytes"):
        assert isinstance(last[key], (int, float)) and last[key] > 0, key
    # 8-bit state: well under the 8 bytes/parameter of fp32 Adam.
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert last["opt_state_bytes_per_rank"] < 4 * summary["params"]
    png = (tmp_path / "out" / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final val loss" in result.stdout
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000150"]


@pytest.mark.parametrize("mode", SHARDED_MODES)
def test_resume_is_exact(tmp_path, reference, mode):
    if not mode_available(mode):
        pytest.skip(f"sharding mode {mode} not available")
    sets = tiny_sets(tmp_path, **{"sharding.mode": mode})
    _ok(run(torchrun_cmd(*sets, "--resume", "auto", "--stop-at", "20")))
    assert [r["step"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl")][-1] == 20
    second = run(torchrun_cmd(*sets, "--resume", "auto"))
    _ok(second)
    assert "resumed from" in second.stdout and "at step 20" in second.stdout
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert _losses(records) == _losses(reference(mode))
    # one run record for both attempts
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(a["start_step"], a["end_step"]) for a in summary["attempts"]] == [(0, 20), (20, 40)]
    assert summary["final_loss"] == records[-1]["loss"] and summary["step"] == 40
    # keep=2 rotation
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000030", "step-00000040"]


def test_deepspeed_without_a_launcher_is_a_world_of_one(tmp_path):
    """`dist8 train --set sharding.mode=deepspeed` in one process: DeepSpeed asserts a launcher's LOCAL_RANK."""
    if not mode_available("deepspeed"):
        pytest.skip("sharding mode deepspeed not available")
    result = run(train_cmd(*tiny_sets(tmp_path, steps=3, **{"sharding.mode": "deepspeed", "train.eval_every": 3})))
    _ok(result)
    assert "DeepSpeed x1" in result.stdout


def test_deepspeed_zero3_resume_is_exact(tmp_path):
    """ZeRO-3 partitions the parameters: the resume takes them from the optimizer's saved fp32 partitions
    (every rank's state dict, as DeepSpeed's own loader passes them) and only buffers from the model entry."""
    if not mode_available("deepspeed"):
        pytest.skip("sharding mode deepspeed not available")

    def sets(d):
        return tiny_sets(d, steps=8, **{"sharding.mode": "deepspeed", "checkpoint.every": 4, "train.eval_every": 4,
                                        "sharding.deepspeed_config": str(REPO / "configs" / "deepspeed-zero3.json")})

    _ok(run(torchrun_cmd(*sets(tmp_path / "full"))))
    _ok(run(torchrun_cmd(*sets(tmp_path / "part"), "--stop-at", "4")))
    second = run(torchrun_cmd(*sets(tmp_path / "part"), "--resume", "auto"))
    _ok(second)
    assert "at step 4" in second.stdout
    full = read_metrics(tmp_path / "full" / "out" / "metrics.jsonl")
    assert_trained(full)
    assert _losses(read_metrics(tmp_path / "part" / "out" / "metrics.jsonl")) == _losses(full)


def test_two_nodes_train_together(tmp_path, reference):
    """Two torchrun invocations (--nnodes=2, one process each) on a 127.0.0.1 rendezvous."""
    mode = "dist8-zero2" if mode_available("dist8-zero2") else "ddp"
    port = free_port()
    sets = tiny_sets(tmp_path, **{"sharding.mode": mode})
    procs = [
        subprocess.Popen(torchrun_cmd(*sets, nproc=1, port=port,
                                      extra=["--nnodes=2", f"--node_rank={i}", "--master_addr=127.0.0.1"]),
                         cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "world size            2" in outs[0][0]
    # Same ranks, same data, same maths as one node with two processes.
    assert _losses(read_metrics(tmp_path / "out" / "metrics.jsonl")) == _losses(reference(mode))


def test_data_path_text_file_single_process(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 2000)
    result = run(train_cmd(*tiny_sets(tmp_path, steps=30, **{"data.path": str(text), "train.eval_every": 15})))
    _ok(result)
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert records[-1]["step"] == 30
    assert records[-1]["val_loss"] < 3.0  # a repeated sentence is easy
    assert str(text) in result.stdout


CONFIG_ERRORS = [
    (["--set", "train.stepz=5"], "unknown config key train.stepz; valid keys of 'train': steps, batch_size"),
    (["--set", "trian.steps=5"], "unknown config section 'trian'"),
    (["--set", "train.steps=abc"], "config key train.steps: expected integer, got str 'abc'"),
    (["--set", "model.stable_embedding=3"], "config key model.stable_embedding: expected boolean"),
    (["--set", "optimizer.name=Adam9bit"], "unknown optimizer 'Adam9bit'"),
    (["--set", "optimizer.args={betas: 0.9}"], "optimizer.args is not valid for AdamW8bit"),
    (["--set", "sharding.mode=zero3"], "unknown mode 'zero3'"),
    (["--set", "sharding.mode=deepspeed"], "mode not available"),
    (["--set", "train.lr=-1"], "train.lr must be >= 0"),
    (["--set", "train.lr=-1e-3"], "train.lr must be >= 0"),  # an exponent float without a dot is a number
    (["--set", "model.dtype=fp16", "--set", "optimizer.name=torch.adamw"],
     "torch's Adam keeps fp16 moments for fp16 parameters and its eps=1e-08 is 0 in fp16"),
    (["--set", "train.steps"], "--set expects key=value"),
    (["--set", "data.path=/nonexistent/corpus"], "config key data.path: '/nonexistent/corpus' does not exist"),
    (["--nproc-per-node", "2", "--set", "train.stepz=5"], "unknown config key train.stepz"),  # checked before launching
    (["--config", "/nonexistent/cfg.yaml"], "cannot read config"),
    (["--set", "train.lr=.nan"], "config key train.lr: expected a finite number, got nan"),  # passed every range check
    (["--set", "train.clip=.inf"], "config key train.clip: expected a finite number, got inf"),
    (["--set", "train.steps=99999999999999999999999"], "config key train.steps: 99999999999999999999999 is out of range"),
    (["--set", "train.min_lr=1"], "config key train.min_lr (1) must be <= train.lr (0.003) with train.schedule cosine"),
    (["--set", "train.max_nonfinite_steps=-1"], "config key train.max_nonfinite_steps must be >= 0"),
    (["--set", "data.glob=*.nothing"], "config key data.glob: no file under CPython stdlib"),
    (["--set", "model.n_layer=100000", "--set", "model.d_model=8192", "--set", "model.n_head=8"],
     "config keys model.n_layer=100000, model.d_model=8192: the model's"),
    (["--set", "train.batch_size=1000000000", "--set", "sharding.mode=ddp"],
     "config keys train.batch_size=1000000000, model.seq_len=128: one batch's logits alone need"),
]




@pytest.mark.parametrize("args,expected", CONFIG_ERRORS, ids=[" ".join(a)[:40] for a, _ in CONFIG_ERRORS])
def test_config_errors_one_line_exit_2(args, expected, monkeypatch, capsys):
    """`dist8 train` in this process (no interpreter start per case): one line on stderr, exit code 2."""
    from dist8.cli import main

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # importing deepspeed fails: mode "not available"
    # A run-time check (model size) runs the job in this process, which sets LOCAL_RANK as a launcher would;
    # setenv makes monkeypatch remove it afterwards (accelerate in a later test of this worker reads it).
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.chdir(REPO)
    argv = ["train", *args] if args[0] == "--config" else ["train", "--config", str(REPO / "configs" / "tiny-gpt.yaml"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, (args, err)
    assert lines[0].startswith("dist8 train: error: ")
    assert expected in lines[0], (args, lines[0])


HOSTILE = [".nan", ".inf", "-.inf", "-1", "0", "1e30", "99999999999999999999999", "'x'", "[1, 2]", "{a: 1}", "null", "true"]


def test_every_config_key_refuses_hostile_values_naming_it_or_holds_a_sane_value():
    """Every key of every section against values a typo or a script could produce: refused with a ConfigError
    naming the key, or accepted as a finite number, a 64-bit integer, a bool or a string. (A fuzz running each
    accepted value for two steps found nan/inf learning rates and clips passing every range check.)"""
    import dataclasses
    import math

    from dist8.train.config import Config

    refused = accepted = 0
    for section in dataclasses.fields(Config):
        for field in dataclasses.fields(section.default_factory()):
            key = f"{section.name}.{field.name}"
            if field.name.startswith("fault_") or key == "optimizer.args":
                continue
            for value in HOSTILE:
                try:
                    cfg = load_config(REPO / "configs" / "tiny-gpt.yaml", [f"{key}={value}"])
                except ConfigError as exc:
                    assert key in str(exc) and "\n" not in str(exc), (key, value, str(exc))
                    refused += 1
                    continue
                got = getattr(getattr(cfg, section.name), field.name)
                assert got is None or isinstance(got, (bool, str)) or (isinstance(got, float) and math.isfinite(got)) \
                    or (isinstance(got, int) and abs(got) < 2**63), (key, value, got)
                accepted += 1
    assert refused > 300 and accepted > 10, (refused, accepted)  # 385 and 23 when written


def test_config_error_of_a_fresh_process_is_one_line_exit_2():
    result = subprocess.run([sys.executable, "-m", "dist8", "train", "--set", "train.stepz=5"], cwd=REPO,
                            env=child_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        "dist8 train: error: unknown config key train.stepz; valid keys of 'train': steps, batch_size, grad_accum, "
        "lr, warmup_steps, min_lr, schedule, clip, seed, precision, eval_every, eval_batches, log_every, "
        "gradient_release, weight_grad_chunk, max_nonfinite_steps"]


def test_set_overrides_and_validation_in_process():
    cfg = load_config(REPO / "configs" / "tiny-gpt.yaml",
                      ["train.steps=7", "optimizer.args.betas=[0.8, 0.9]", "data.max_bytes=1000000",
                       "model.stable_embedding=false"])
    assert cfg.train.steps == 7 and cfg.optimizer.args["betas"] == [0.8, 0.9]
    assert load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4  # YAML 1.1 would read the string '3e-4'
    assert load_config(None, ["model.dtype=fp16", "optimizer.name=torch.adamw", "optimizer.args={eps: 1.0e-4}"]) \
        .model.dtype == "fp16"  # an eps that fp16 holds is fine
    assert cfg.data.max_bytes == 1_000_000 and cfg.model.stable_embedding is False
    assert cfg.optimizer.args["weight_decay"] == 0.1  # untouched sibling keys survive
    with pytest.raises(ConfigError, match="model.d_model .* divisible"):
        load_config(None, ["model.n_head=3"])
    from dist8.train.engine import check_mode_available

    with pytest.raises(ConfigError, match="shards dist8 optimizers only"):  # before fit_to_optimizer
        check_mode_available(load_config(None, ["sharding.mode=dist8-zero2", "optimizer.name=torch.adamw"]))


def test_torch_baseline_is_one_set_away():
    """``--set optimizer.name=torch.adamw`` on the 8-bit config: dist8-only args dropped, ddp, own directories."""
    from dist8.train.config import fit_to_optimizer
    from dist8.train.engine import check_mode_available

    cfg = load_config(REPO / "configs" / "tiny-gpt.yaml", ["optimizer.name=torch.adamw"])
    notes = fit_to_optimizer(cfg)
    assert notes == ["optimizer.args.block_size does not apply to torch.adamw (torch.optim.AdamW); dropped",
                     "sharding.mode dist8-zero2 shards dist8 optimizers only; torch.adamw runs under ddp"]
    assert cfg.optimizer.args == {"betas": [0.9, 0.95], "weight_decay": 0.1}
    assert cfg.sharding.mode == "ddp"
    assert (cfg.output.dir, cfg.checkpoint.dir) == ("runs/tiny-gpt/torch.adamw", "checkpoints/tiny-gpt/torch.adamw")
    check_mode_available(cfg)
    assert fit_to_optimizer(cfg) == []  # idempotent
    eight_bit = load_config(REPO / "configs" / "tiny-gpt.yaml")
    assert fit_to_optimizer(eight_bit) == []
    assert eight_bit.output.dir == "runs/tiny-gpt/adamw8bit" and eight_bit.optimizer.args["block_size"] == 256
    # a bad value of an argument that does apply still fails
    with pytest.raises(ConfigError, match="optimizer.args is not valid for AdamW"):
        load_config(None, ["optimizer.name=torch.adamw", "optimizer.args={betas: 0.9}"])


def test_lr_schedule_and_sampling_are_pure_functions():
    from dist8.train.data import sample_seed
    from dist8.train.trainer import lr_at

    cfg = load_config(None, ["train.steps=100", "train.warmup_steps=10", "train.lr=1.0", "train.min_lr=0.1"])
    assert lr_at(cfg, 5) == pytest.approx(0.5)
    assert lr_at(cfg, 10) == pytest.approx(1.0)
    assert lr_at(cfg, 100) == pytest.approx(0.1)
    assert lr_at(cfg, 55) == pytest.approx(0.55)
    assert sample_seed(0, "train", 3, 1, 0) == sample_seed(0, "train", 3, 1, 0)
    assert len({sample_seed(0, "train", s, r, 0) for s in range(50) for r in range(4)}) == 200


def test_plot_skipped_says_what_to_install(tmp_path, monkeypatch):
    from dist8.train.report import plot_run

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    why = plot_run([{"step": 1, "loss": 1.0}], {"params": 10}, tmp_path / "p.png")
    assert why == 'matplotlib is not installed; python -m pip install matplotlib (or the plot extra: ' \
                  'python -m pip install -e ".[plot]")'
    assert not (tmp_path / "p.png").exists()


def test_run_summary_covers_every_attempt(tmp_path):
    from dist8.train.report import run_summary

    path = tmp_path / "summary.json"
    records = [{"step": s, "loss": 5.0 - s, "val_loss": None, "peak_mem_bytes": 100 + s} for s in range(1, 21)]
    first = run_summary(path, records[:10], {"start_step": 0, "end_step": 10, "world_size": 2, "wall_s": 5.0,
                                             "train_s": 4.0, "tokens": 400, "peak_mem_bytes": 500}, resumed=False)
    path.write_text(json.dumps(first))
    second = run_summary(path, records, {"start_step": 10, "end_step": 20, "world_size": 1, "wall_s": 3.0,
                                         "train_s": 2.0, "tokens": 200, "peak_mem_bytes": 300}, resumed=True)
    assert second["final_loss"] == records[-1]["loss"] and second["step"] == 20
    assert second["wall_s"] == 8.0 and second["tokens_per_s"] == 600 / 6.0 and second["peak_mem_bytes"] == 500
    assert [a["world_size"] for a in second["attempts"]] == [2, 1] and second["world_size"] == 1
    path.write_text(json.dumps(second))
    noop = run_summary(path, records, {"start_step": 20, "end_step": 20, "world_size": 1, "wall_s": 1.0,
                                       "train_s": 0.0, "tokens": 0, "peak_mem_bytes": 9999}, resumed=True)
    assert noop == second  # resuming a finished run changes nothing


def test_a_resume_at_another_world_size_says_the_batch_changed(tmp_path):
    """dist8 checkpoints load at any world size, and the global batch follows the ranks: the losses then
    differ from the uninterrupted run's from the resumed step on, which the job did not say (outside probe)."""
    sets = tiny_sets(tmp_path, steps=6, **{"sharding.mode": "dist8-zero2", "checkpoint.every": 3,
                                           "train.eval_every": 0})
    _ok(run(train_cmd(*sets, "--stop-at", "3")))
    resumed = run(torchrun_cmd(*sets, "--resume", "auto"))
    _ok(resumed)
    assert ("note: the checkpoint was saved by 1 rank(s), this run has 2: each step now takes 16 sequences "
            "(train.batch_size x train.grad_accum x ranks) where it took 8") in resumed.stdout, resumed.stdout[-2000:]
