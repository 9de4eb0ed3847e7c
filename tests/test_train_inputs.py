"""Bad inputs to ``dist8 train``: one line naming the key or file before anything runs, and nothing lost.

Config checks run in this process without training; two short in-process runs cover what only a run
shows (override patterns against the model's names, a failed run next to a previous run's files).

- Duplicate YAML keys (the last one silently won) and an empty config file (all defaults) are refused.
- ``optimizer.args.overrides``: an ``lr`` there is refused like ``optimizer.args.lr``; patterns are
  matched against the model's parameter names, not the config check's dummy parameter.
- A fresh run leaves a previous run's files in ``output.dir`` alone until its first record.
- Inputs that gave tracebacks or hung: huge integers in ``optimizer.args``, an ``output.dir`` that
  is or lies under a file, a DeepSpeed JSON that is not an object or that DeepSpeed refuses, a FIFO
  in a data directory.
- The DeepSpeed JSON's ``optimizer`` section must agree with the job's (it was dropped without a word).
- The test-only ``train.fault_*`` keys are refused unless ``DIST8_TRAIN_TEST_FAULTS=1``.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from dist8.train.config import FAULTS_ENV, ConfigError, check_override_patterns, load_config
from dist8.train.yaml_io import DuplicateKeyError, load_yaml
from train_utils import REPO, mode_available

TINY = """\
model:
  n_layer: 1
  n_head: 2
  d_model: 32
  seq_len: 16
  stable_embedding: false
data:
  path: {data}
  max_bytes: 50000
  val_fraction: 0.1
train:
  steps: 3
  batch_size: 2
  warmup_steps: 1
  eval_every: 0
  eval_batches: 1
  log_every: 1
optimizer:
  name: AdamW8bit
  args:
    min_8bit_size: 0
sharding:
  mode: ddp
output:
  dir: {out}
  plot: false
"""
BIG = "1" * 400  # an integer of 400 digits


@pytest.fixture
def tiny(tmp_path) -> Path:
    """A tiny config (1-layer model, a small text file) writing into ``tmp_path / "out"``."""
    data = tmp_path / "corpus.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY.format(data=data, out=tmp_path / "out"))
    return config


def _refused(match: str, path, *sets: str) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(path, list(sets))
    assert "\n" not in str(err.value), str(err.value)
    assert match in str(err.value), (match, str(err.value))
    return str(err.value)


# ---- F9, F10: the YAML itself ---------------------------------------------------------------------
def test_a_second_section_or_a_repeated_key_is_refused_naming_it_and_both_lines(tiny):
    """A second `train:` appended to change the steps discarded the whole first section (lr, batch size...)."""
    appended = tiny.with_name("appended.yaml")
    appended.write_text(tiny.read_text() + "train:\n  steps: 1\n")
    first = tiny.read_text().splitlines().index("train:") + 1
    last = len(appended.read_text().splitlines()) - 1
    _refused(f"appended.yaml': line {last}: duplicate key 'train' (first on line {first})", appended)
    inside = tiny.with_name("inside.yaml")
    inside.write_text(tiny.read_text().replace("  steps: 3\n", "  steps: 3\n  steps: 2\n"))
    _refused("duplicate key 'steps'", inside)
    with pytest.raises(DuplicateKeyError, match=r"flow: line 1: duplicate key 'a' \(first on line 1\)"):
        load_yaml("{a: 1, b: 2, a: 3}", "flow")
    _refused("--set optimizer.args: line 1: duplicate key 'eps'", tiny, "optimizer.args={eps: 1.0e-6, eps: 1.0e-7}")
    assert load_yaml("a: {b: 1}\nc: {b: 2}\n", "x") == {"a": {"b": 1}, "c": {"b": 2}}  # same key, other mappings


@pytest.mark.parametrize("text", ["", "# only a comment\n", "\n\n  \n", "---\n", "null\n"])
def test_an_empty_or_comment_only_config_file_is_refused_naming_it(tmp_path, text):
    """It was read as all defaults: a 1000-step run on the standard library into runs/tiny-gpt."""
    path = tmp_path / "blank.yaml"
    path.write_text(text)
    _refused(f"config '{path}' is empty", path)
    assert load_config(None).train.steps == 1000  # no --config at all: the defaults, as before


# ---- F11: optimizer.args.overrides -------------------------------------------------------------------
def test_an_lr_override_is_refused_like_optimizer_args_lr(tiny):
    """`{'*': {lr: 10.0}}` replaced train.lr and its schedule (loss 5.5 -> 4741) while the metrics logged the
    schedule's lr."""
    _refused("config key optimizer.args.overrides['*'].lr: set the learning rate with train.lr", tiny,
             "optimizer.args.overrides={'*': {lr: 10.0}}")
    _refused("config key optimizer.args.lr: set the learning rate with train.lr", tiny, "optimizer.args.lr=0.1")


def test_override_settings_are_checked_at_config_time_and_patterns_against_the_models_names(tiny):
    """The config check built the optimizer on one parameter named `dummy`, so every pattern naming a real
    parameter was refused ("matches no parameter name (names look like dummy)")."""
    cfg = load_config(tiny, ["optimizer.args.overrides={'head.*': {weight_decay: 0.0}, 'tok.*': {optim_bits: 32}}"])
    assert cfg.optimizer.args["overrides"]["head.*"] == {"weight_decay": 0.0}
    message = _refused("config key optimizer.args.overrides['head.*'] is not valid for AdamW8bit: eps must be",
                       tiny, "optimizer.args.overrides={'head.*': {eps: -1.0}}")
    assert "override 'head.*'" in message and "__dist8" not in message
    _refused("config key optimizer.args.overrides must be a mapping", tiny, "optimizer.args.overrides=[1]")
    names = ["tok.weight", "blocks.0.attn.qkv.weight", "head.weight"]
    check_override_patterns(cfg.optimizer.args, names)
    typo = load_config(tiny, ["optimizer.args.overrides={'hed.*': {weight_decay: 0.0}}"])  # the model decides
    with pytest.raises(ConfigError, match=r"^config key optimizer.args.overrides: overrides pattern 'hed.\*' matches "
                                          r"no parameter name \(names look like tok.weight"):
        check_override_patterns(typo.optimizer.args, names)


# ---- F13: tracebacks ---------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["eps", "weight_decay", "percentile_clipping", "betas"])
def test_huge_integers_in_optimizer_args_are_refused_naming_the_key(tiny, key):
    value, where = (f"[0.9, {BIG}]", "optimizer.args.betas[1]") if key == "betas" else (BIG, f"optimizer.args.{key}")
    _refused(f"config key {where}: {BIG[:20]}", tiny, f"optimizer.args.{key}={value}")


def test_a_block_size_the_optimizer_refuses_is_one_line_naming_it(tiny):
    """2**30 was std::bad_alloc at the first step; the optimizer's own bound refuses it, reported as config."""
    _refused("config key optimizer.args is not valid for AdamW8bit: block_size must be", tiny,
             "optimizer.args.block_size=1073741824")


@pytest.mark.parametrize("key", ["output.dir", "checkpoint.dir"])
def test_a_directory_key_naming_a_file_or_a_path_under_one_is_refused(tiny, key):
    """FileExistsError / NotADirectoryError tracebacks after the model was built."""
    afile = tiny.with_name("afile")
    afile.write_text("x")
    _refused(f"config key {key}: '{afile}' exists and is not a directory", tiny, f"{key}={afile}")
    _refused(f"config key {key}: '{afile}/run' cannot be created: '{afile}' is not a directory", tiny,
             f"{key}={afile}/run")


def test_non_regular_files_in_a_data_directory_are_skipped_and_a_fifo_path_refused(tmp_path):
    """A FIFO in data.path's directory: reading it waited for a writer forever."""
    from dist8.train.config import DataConfig
    from dist8.train.data import load_corpus

    data = tmp_path / "data"
    data.mkdir()
    for i in range(40):
        (data / f"f{i}.txt").write_text(f"file {i} " * 50)
    os.mkfifo(data / "pipe.txt")
    found: dict = {}
    config = DataConfig(path=str(data), val_fraction=0.5)
    worker = threading.Thread(target=lambda: found.update(corpus=load_corpus(config, 16)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "reading the data directory hangs on its FIFO"
    assert sum(found["corpus"].n_files) == 40
    with pytest.raises(ConfigError, match="config key data.path: .*pipe.txt' is neither a regular file nor a dir"):
        load_corpus(DataConfig(path=str(data / "pipe.txt")), 16)


# ---- F13, F14: the DeepSpeed JSON ---------------------------------------------------------------------
DS_CASES = [
    ("{bad json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"zero_optimization": {"stage": "two"}}', "DeepSpeed refuses {path}: DeepSpeedZeroConfig.stage: Input should be"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "dist8.Lion8bit", "params": {"bogus_key": 1}}}',
     "{path}: its optimizer section names 'dist8.Lion8bit', but the job trains optimizer.name AdamW8bit; the job's "
     "optimizer section (optimizer.name, optimizer.args) and train.lr decide: remove the section"),
    ('{"optimizer": {"type": "dist8.AdamW8bit", "params": {"bogus_key": 1}}}', "unknown key 'bogus_key'"),
    ('{"optimizer": {"type": "dist8.AdamW8bit", "params": {"eps": 1e-6}}}',
     "its optimizer section sets params.eps = 1e-06, but the job uses optimizer.args.eps = 1e-08"),
    ('{"scheduler": {"type": "WarmupLR"}}', "has a 'scheduler' section; the job's train.lr and train.schedule"),
]


@pytest.mark.skipif(not mode_available("deepspeed"), reason="sharding mode deepspeed not available")
def test_a_deepspeed_json_the_job_would_not_run_as_written_is_refused_naming_it(tiny):
    """Tracebacks (JSONDecodeError, AttributeError, pydantic's report), and an optimizer section dropped without
    a word (`dist8.Lion8bit` with a bogus key trained AdamW8bit)."""
    from dist8.train.engine import check_mode_available

    for i, (text, expected) in enumerate(DS_CASES):
        path = tiny.with_name(f"ds{i}.json")
        path.write_text(text)
        cfg = load_config(tiny, ["sharding.mode=deepspeed", f"sharding.deepspeed_config={path}"])
        with pytest.raises(ConfigError) as err:
            check_mode_available(cfg)
        assert str(err.value).startswith("config key sharding.deepspeed_config: ") and "\n" not in str(err.value)
        assert expected.format(path=path) in str(err.value), (text, str(err.value))
    # the shipped JSONs name the job's optimizer with its values: accepted, and said to be unused
    for name in ("deepspeed-zero2.json", "deepspeed-zero3.json"):
        shipped = load_config(REPO / "configs" / "tiny-gpt.yaml",
                              ["sharding.mode=deepspeed", f"sharding.deepspeed_config={REPO / 'configs' / name}"])
        assert check_mode_available(shipped) == [
            f"sharding.deepspeed_config {REPO / 'configs' / name}: its optimizer section agrees with the job's and "
            "is not used, nor its lr 0.0003 (train.lr 0.003 and its schedule set it); the job's optimizer section "
            "(optimizer.name, optimizer.args) and train.lr decide",
            # the batch-size and clipping values the job replaces with its own were replaced without a word
            f"sharding.deepspeed_config {REPO / 'configs' / name}: its train_micro_batch_size_per_gpu 4 is replaced "
            "by the job's train.batch_size 16"]
    path = tiny.with_name("clip.json")
    path.write_text('{"gradient_clipping": 0.5, "train_batch_size": 64, "gradient_accumulation_steps": "auto"}')
    cfg = load_config(tiny, ["sharding.mode=deepspeed", f"sharding.deepspeed_config={path}", "train.clip=1.0"])
    assert check_mode_available(cfg) == [
        f"sharding.deepspeed_config {path}: its gradient_clipping 0.5 is replaced by the job's train.clip 1.0",
        f"sharding.deepspeed_config {path}: its train_batch_size 64 is not used; train.batch_size x train.grad_accum "
        "x ranks decide"]


# ---- F15: test-only keys ------------------------------------------------------------------------------
def test_fault_injection_keys_need_the_test_switch(tiny, monkeypatch):
    """`train.fault_kill_step: 1` in a user config SIGKILLed the job."""
    monkeypatch.delenv(FAULTS_ENV, raising=False)
    for key in ("fault_kill_step=1", "fault_nan_grad_step=1", "fault_rank=0", "fault_nan_grad_count=2"):
        _refused(f"config key train.{key.split('=')[0]} is test-only fault injection", tiny, f"train.{key}")
    monkeypatch.setenv(FAULTS_ENV, "1")
    assert load_config(tiny, ["train.fault_kill_step=1"]).train.fault_kill_step == 1


# ---- F12 and F11 in a run: nothing of a previous run lost ------------------------------------------------
def test_metrics_writer_replaces_a_previous_run_at_its_first_record(tmp_path):
    from dist8.train.report import MetricsWriter

    old = {"metrics.jsonl": '{"step": 1}\n', "config.json": "{}", "summary.json": "{}", "training.png": "png"}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    said = []
    writer = MetricsWriter(tmp_path, {"new": 1}, resume_step=None, on_replace=said.append)
    writer.close()  # failed before its first record
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old and said == []
    writer = MetricsWriter(tmp_path, {"new": 1}, resume_step=None, on_replace=said.append)
    writer.write({"step": 1, "loss": 2.0})
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics.jsonl"]
    assert json.loads((tmp_path / "config.json").read_text()) == {"new": 1}
    assert said == [["config.json", "metrics.jsonl", "summary.json", "training.png"]]


def _train(config: Path, *sets: str) -> int:
    from dist8.cli import main

    return main(["train", "--config", str(config), *(arg for s in sets for arg in ("--set", s))])


def test_a_failed_run_keeps_the_previous_runs_files_and_patterns_name_real_parameters(tiny, monkeypatch, capsys):
    """A run crashing at its first steps emptied the previous run's metrics.jsonl (1112 -> 0 bytes) and rewrote
    config.json, leaving its summary.json describing metrics that were gone. Also: an override naming a real
    parameter (`head.*`) trains; a pattern naming none is refused on the model's names, before any file."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # the job sets it for a world of one; monkeypatch removes it afterwards
    monkeypatch.setenv("TQDM_DISABLE", "1")
    out = tiny.with_name("out")
    assert _train(tiny, "optimizer.args.overrides={'head.*': {weight_decay: 0.0}}") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"metrics.jsonl", "summary.json", "config.json"} <= set(before) and before["metrics.jsonl"]
    capsys.readouterr()
    # diverges at step 2, before its first record (log_every 100)
    assert _train(tiny, "train.lr=1e30", "train.warmup_steps=0", "train.clip=0", "train.log_every=100") == 2
    assert "loss is nan at step 2" in capsys.readouterr().err
    assert _train(tiny, "optimizer.args.overrides={'hed.*': {weight_decay: 0.0}}") == 2
    assert capsys.readouterr().err.splitlines() == [
        "dist8 train: error: config key optimizer.args.overrides: overrides pattern 'hed.*' matches no parameter "
        "name (names look like tok.weight, pos.weight, blocks.0.ln1.weight, blocks.0.ln1.bias; a tied weight, e.g. "
        "lm_head.weight = wte.weight, is named once, by its first module)"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_fresh_run_into_a_checkpoint_dir_of_an_earlier_run_is_refused_and_changes_nothing(tiny, monkeypatch,
                                                                                            capsys):
    """A fresh run (no --resume) into a checkpoint.dir holding a longer earlier run's checkpoints saved beside
    them; checkpoint.keep rotated its own lower-numbered ones away at once, `latest` pointed at a deleted
    checkpoint and --resume auto then continued the earlier run (found reading the rotation, reproduced:
    steps 5 and 10 saved and gone). Refused now before anything is trained or written."""
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    ckpt = tiny.with_name("ckpt")
    keep = ("checkpoint.dir=" + str(ckpt), "checkpoint.every=2", "checkpoint.keep=2")
    assert _train(tiny, "train.steps=6", *keep) == 0
    before = {p.relative_to(tiny.parent): p.read_bytes() for p in tiny.parent.rglob("*") if p.is_file()}
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]
    capsys.readouterr()
    assert _train(tiny, "train.steps=4", *keep) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"dist8 train: error: config key checkpoint.dir: {ckpt} holds an earlier run's checkpoints (newest "
        "step-00000006); a fresh run would save beside them and checkpoint.keep would rotate its own away: pass "
        "--resume auto to continue that run, or use another checkpoint.dir (or remove them)")
    assert {p.relative_to(tiny.parent): p.read_bytes() for p in tiny.parent.rglob("*") if p.is_file()} == before


# ---- found by an outside probe (2026-12-05) ------------------------------------------------------
@pytest.mark.parametrize("text, read_as", [("10:00", "600"), ("0x10", "16"), ("010", "8"), ("1:30.5", "90.5")])
def test_yaml_1_1_numbers_in_base_60_octal_or_hex_are_refused(tiny, text, read_as):
    """`steps: 10:00` ran 600 steps and `0x10` 16, silently (YAML 1.1's resolvers)."""
    text_before = tiny.read_text()
    tiny.write_text(text_before.replace("  steps: 3\n", f"  steps: {text}\n"))
    line = text_before.splitlines().index("  steps: 3") + 1
    _refused(f"config '{tiny}': line {line}: '{text}' is the number {read_as} in YAML 1.1 (base 60, octal or "
             "hex); write numbers in decimal, or quote a string", tiny)
    assert load_yaml("a: 1_000\nb: 3e-4\nc: '10:00'", "x") == {"a": 1000, "b": 3e-4, "c": "10:00"}


@pytest.mark.parametrize("key", ["output.dir", "checkpoint.dir"])
def test_an_empty_directory_key_is_refused(tiny, key):
    """`output.dir: ""` wrote metrics.jsonl, summary.json and the plot into the working directory, replacing
    files of those names there; `checkpoint.dir: ""` meant no checkpoints, silently."""
    _refused(f"config key {key} must be a directory path, got ''", tiny, f"{key}=''")


def test_a_config_that_is_not_a_regular_file_is_refused_without_waiting(tmp_path):
    """A FIFO with no writer as --config hung the job (the data path's FIFO check did not cover it)."""
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    done = []
    worker = threading.Thread(target=lambda: done.append(_refused("is not a regular file", fifo)), daemon=True)
    worker.start()
    worker.join(30)
    assert done, "reading a FIFO config hung"


def test_the_directory_lock_refuses_a_second_job_naming_the_first(tmp_path):
    """Two jobs writing one directory corrupted each other (a save failing on a file the other had renamed,
    metrics lost); the second is refused in one line naming the key and the first job's pid."""
    from dist8.train.lock import LOCK_NAME, directory_lock

    with directory_lock(tmp_path / "ckpt", "checkpoint.dir"):
        with pytest.raises(ConfigError, match=rf"^config key checkpoint.dir: '{tmp_path}/ckpt' is in use by another "
                                              rf"dist8 train job \(pid {os.getpid()}\); wait for it to end"):
            with directory_lock(tmp_path / "ckpt", "checkpoint.dir"):
                pass
    with directory_lock(tmp_path / "ckpt", "checkpoint.dir"):  # released when the first job ended
        assert (tmp_path / "ckpt" / LOCK_NAME).is_file()


def test_a_full_disk_is_one_line_naming_the_file(tmp_path, monkeypatch):
    """A file-size limit hit while saving gave a one-line message not naming the file, then a 42-line
    SafetensorError traceback; hit while writing metrics, 78 lines of tracebacks."""
    import torch
    from safetensors import SafetensorError

    import dist8
    import dist8.checkpoint.io as ckio
    from dist8.checkpoint import CheckpointError
    from dist8.train.report import MetricsWriter

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")

    monkeypatch.setattr(ckio, "save_file", full)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(CheckpointError, match=r"^writing .*optim-00000-of-00001\.safetensors failed: Error while "
                                              r"serializing: I/O error: File too large \(os error 27\)$"):
        dist8.checkpoint.save(tmp_path / "ckpt", model, dist8.AdamW8bit(model.parameters()), step=1)
    (tmp_path / "out" / "metrics.jsonl").mkdir(parents=True)  # what cannot be written, as a full disk
    with pytest.raises(ConfigError, match=r"^config key output.dir: writing .*metrics.jsonl failed: "):
        MetricsWriter(tmp_path / "out", {}, None).write({"step": 1})
