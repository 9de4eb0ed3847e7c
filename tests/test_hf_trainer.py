"""dist8 under HF Trainer (transformers), a client nobody on the project wrote: tiny models built from
configs (no downloads), resumed from the Trainer's own checkpoints.

* ``test_hf_trainer_save_and_resume_bitwise``: a tiny randomly initialised GPT-2 (from a
  config, no downloads) trained by ``transformers.Trainer`` with
  ``optimizer_cls_and_kwargs=(dist8.AdamW8bit, ...)``; a run saved at step 3 and resumed
  (``resume_from_checkpoint``) ends bitwise equal to an uninterrupted run.
* ``test_hf_trainer_with_a_deepspeed_config_naming_dist8_resumes_exactly``: the Trainer given a
  DeepSpeed config (ZeRO 2 and 3) whose optimizer is ``"type": "dist8.AdamW8bit"`` with "auto"
  values; resuming from its checkpoint repeats the uninterrupted run's losses and weights exactly.
* ``test_hf_trainer_run_started_with_torch_adamw_continues_with_dist8``: a checkpoint of a Trainer
  run with torch's AdamW resumes with dist8 after ``from_torch_optim`` converts its ``optimizer.pt``.
* ``test_hf_trainer_ddp_with_sharded_optimizer_resumes_bitwise``: 2 DDP ranks, ``ShardedOptimizer``
  with ``full_state_dict=True`` and ``ShardedStateDictCallback``: rank 0's ``optimizer.pt`` holds
  every rank's blocks and the resumed run is bitwise.
* ``test_hf_trainer_gradient_release_callback_*``, ``test_hf_trainer_llama_with_chunked_weight_gradients_*``:
  gradient release installed by ``GradientReleaseCallback`` is the normal step, bitwise; the settings it
  cannot work with are refused before any step.
"""

import os

import pytest
import torch
from torch import nn

import dist8
from dist_utils import run_ranks

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- HF Trainer ------------------------------------------------------------------------------------
def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=16):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 128, (n, seq), generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _training_args(out_dir, max_steps=6, **extra):
    """The Trainer settings every test here shares: batch 4, a checkpoint every 3 steps, a loss per step."""
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             save_strategy="steps", save_steps=3, report_to=[], seed=0, logging_steps=1,
                             disable_tqdm=True, **extra)


def _trainer(out_dir, max_steps, bf16_master=False, min_8bit_size=1024):
    """``bf16_master``: the model cast to bf16 (dist8.cast_model: LayerNorms stay fp32) and the
    optimizer keeping 24-bit masters (``master_weight_bits=24``)."""
    from transformers import Trainer

    args = _training_args(out_dir, max_steps, use_cpu=True, lr_scheduler_type="linear", warmup_steps=2)
    model = _tiny_gpt2()
    kwargs = {"lr": 3e-3, "min_8bit_size": min_8bit_size}
    if bf16_master:
        dist8.cast_model(model, torch.bfloat16)
        kwargs["master_weight_bits"] = 24
    return Trainer(model=model, args=args, train_dataset=_Tokens(), optimizer_cls_and_kwargs=(dist8.AdamW8bit, kwargs))


def test_hf_trainer_save_and_resume_bitwise(tmp_path):
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    full = _trainer(tmp_path / "full", 6)
    full.train()
    assert isinstance(full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer,
                      dist8.AdamW8bit)
    kinds = {str(v["state1"].dtype) for v in _opt(full).state.values()}
    assert kinds == {"torch.uint8", "torch.float32"}  # matrices 8-bit, LayerNorms and biases 32-bit

    resumed = _trainer(tmp_path / "resumed", 6)  # a fresh process would look the same: new model, new optimizer
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{n} differs after resume"
    for p_full, p_res in zip(full.model.parameters(), resumed.model.parameters()):
        sa, sb = _opt(full).state[p_full], _opt(resumed).state[p_res]
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k


def test_hf_trainer_bf16_master_weights_save_and_resume_bitwise(tmp_path):
    """The same with a bf16 model and master_weight_bits=24: the corrections travel through the
    Trainer's own optimizer checkpoint (torch.save / weights-only load) and the resumed run is bitwise."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    full = _trainer(tmp_path / "full", 6, bf16_master=True)
    full.train()
    opt = _opt(full)
    with_correction = [p for p in full.model.parameters() if "correction" in opt.state[p]]
    assert with_correction and all(p.dtype == torch.bfloat16 for p in with_correction)
    assert all(opt.state[p]["correction"].dtype == torch.int8 for p in with_correction)
    resumed = _trainer(tmp_path / "resumed", 6, bf16_master=True)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (n, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), f"{n} differs after resume"
    for p_full, p_res in zip(full.model.parameters(), resumed.model.parameters()):
        sa, sb = opt.state[p_full], _opt(resumed).state[p_res]
        for k in sa:
            assert torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k], k


def test_hf_trainer_run_started_with_torch_adamw_continues_with_dist8(tmp_path):
    """A Trainer run saved with ``optim="adamw_torch"`` resumes with dist8: the checkpoint's
    ``optimizer.pt`` converted by ``dist8.checkpoint.from_torch_optim`` for the new Trainer's optimizer
    (the same two param groups: decay / no decay). With 32-bit state the resumed run is torch's run to
    float rounding (moments, step count and group values carried over); with 8-bit state it continues
    from the moments' nearest codes."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    import shutil

    from transformers import Trainer

    args = _training_args(tmp_path / "torch", use_cpu=True, lr_scheduler_type="linear", warmup_steps=2,
                          learning_rate=3e-3, optim="adamw_torch")
    torch_full = Trainer(model=_tiny_gpt2(), args=args, train_dataset=_Tokens())
    torch_full.train()
    assert isinstance(_opt(torch_full), torch.optim.AdamW)
    for min_8bit_size in (10**9, 1024):  # all 32-bit state; the matrices 8-bit
        ckpt = tmp_path / f"checkpoint-3-{min_8bit_size}"
        shutil.copytree(tmp_path / "torch" / "checkpoint-3", ckpt)
        resumed = _trainer(tmp_path / f"dist8-{min_8bit_size}", 6, min_8bit_size=min_8bit_size)
        resumed.create_optimizer()
        opt = _opt(resumed)
        converted = dist8.checkpoint.from_torch_optim(torch.load(ckpt / "optimizer.pt", weights_only=True), opt)
        torch.save(converted, ckpt / "optimizer.pt")
        resumed.train(resume_from_checkpoint=str(ckpt))
        wte = resumed.model.transformer.wte.weight
        assert opt.state[wte]["step"] == 6
        pairs = list(zip(resumed.model.named_parameters(), torch_full.model.parameters()))
        if min_8bit_size > 1024:
            for (n, a), b in pairs:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
        else:
            assert opt.state[wte]["state1"].dtype == torch.uint8
            assert all(torch.isfinite(a).all() for (_, a), _ in pairs)


def _opt(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)


def _release_trainer(out_dir, callback=True, **args_extra):
    """A bf16 + 24-bit-master tiny GPT-2 under the Trainer, with GradientReleaseCallback (or without
    it: the normal step), one epoch-free 6-step run saving at step 3."""
    from transformers import Trainer

    from dist8.integrations.hf_trainer import GradientReleaseCallback

    args_extra.setdefault("max_grad_norm", 0)
    args = _training_args(out_dir, 6, use_cpu=True, lr_scheduler_type="linear", warmup_steps=2, **args_extra)
    model = dist8.cast_model(_tiny_gpt2(), torch.bfloat16)
    kwargs = {"lr": 3e-3, "min_8bit_size": 1024, "master_weight_bits": 24}
    return Trainer(model=model, args=args, train_dataset=_Tokens(), optimizer_cls_and_kwargs=(dist8.AdamW8bit, kwargs),
                   callbacks=([GradientReleaseCallback()] if callback else []) + [_grads_before_step()])


def _grads_before_step():
    """A callback that records, right before each optimizer step, how many parameters still hold a
    gradient (under gradient release: none, each was stepped and freed inside backward)."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.counts = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.counts.append(sum(p.grad is not None for p in model.parameters()))

    return Recorder()


def test_hf_trainer_gradient_release_callback_is_the_normal_step_and_resumes_bitwise(tmp_path, recwarn):
    """GradientReleaseCallback: the Trainer's run with gradient release (bf16 + 24-bit masters, FlashOptim's
    5-bytes-per-parameter setting) is bitwise the run without it, a resumed run is bitwise the whole run,
    torch's LR scheduler does not warn that optimizer.step was overridden, and the optimizer steps normally
    again after train()."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    normal = _release_trainer(tmp_path / "normal", callback=False)
    normal.train()
    released = _release_trainer(tmp_path / "released")
    released.train()
    assert not any("overridden" in str(w.message) for w in recwarn), [str(w.message) for w in recwarn]
    resumed = _release_trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "released" / "checkpoint-3"))
    for (n, a), b, c in zip(normal.model.named_parameters(), released.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c), n
    grads_at_step = {name: next(c.counts for c in t.callback_handler.callbacks if hasattr(c, "counts")) for name, t in
                     (("normal", normal), ("released", released), ("resumed", resumed))}
    assert grads_at_step == {"normal": [len(list(normal.model.parameters()))] * 6, "released": [0] * 6,
                             "resumed": [0] * 3}, grads_at_step
    opt = _opt(released)
    assert "step" not in opt.__dict__ or getattr(opt.step, "__func__", None) is not None
    p = next(released.model.parameters())
    p.grad = torch.ones_like(p)
    before = p.detach().clone()
    opt.step()  # released no more: a normal step
    assert not torch.equal(before, p.detach())


@pytest.mark.parametrize("setting, match", [
    ({"max_grad_norm": 1.0}, r"^GradientReleaseCallback needs TrainingArguments\(max_grad_norm=0\), got 1.0: "),
    ({"gradient_accumulation_steps": 2}, r"^GradientReleaseCallback needs TrainingArguments\(gradient_accumulation_steps=1\)"),
    ({"fp16": True}, r"^GradientReleaseCallback does not support TrainingArguments\(fp16=True\)"),
])
def test_hf_trainer_gradient_release_callback_refuses_settings_that_cannot_work(tmp_path, setting, match):
    """The Trainer's default max_grad_norm=1.0 under gradient release clipped nothing and logged grad_norm 0
    (every gradient is stepped and freed inside backward), silently; accumulation was refused only at the
    second backward, fp16's GradScaler only at the first step, after the hooks had stepped with scaled
    gradients. Each is refused when training starts, before any step."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    trainer = _release_trainer(tmp_path, **setting)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=match):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_hf_trainer_llama_with_chunked_weight_gradients_is_the_normal_step(tmp_path):
    """``GradientReleaseCallback(weight_grad_chunk=...)`` on a tiny Llama (grouped-query attention, rotary
    embeddings, gated MLP, untied head; bf16 + 24-bit masters): every nn.Linear and the embedding compute
    their weight gradients in chunks stepped inside backward, and the Trainer's run is bitwise its run
    with the normal step."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback

    from dist8.integrations.hf_trainer import GradientReleaseCallback

    class Chunked(TrainerCallback):  # what the release chunked, read while it is installed
        def __init__(self, release):
            self.release, self.seen = release, None

        def on_step_begin(self, args, state, control, **kwargs):
            chunks = self.release.handle.chunks
            self.seen = self.seen or (len(chunks.chunked), dict(chunks.unchunked))

    def run(callbacks):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
        model = dist8.cast_model(LlamaForCausalLM(cfg), torch.bfloat16)
        kwargs = {"lr": 3e-3, "min_8bit_size": 1024, "master_weight_bits": 24}
        trainer = Trainer(model=model, args=_training_args(tmp_path / str(len(callbacks)), 4, use_cpu=True, max_grad_norm=0),
                          train_dataset=_Tokens(), optimizer_cls_and_kwargs=(dist8.AdamW8bit, kwargs), callbacks=callbacks)
        trainer.train()
        return [p.detach().clone() for p in trainer.model.parameters()]

    release = GradientReleaseCallback(weight_grad_chunk=2048)
    seen = Chunked(release)
    chunked = run([release, seen])
    assert seen.seen == (2 * 7 + 2, {})  # 7 Linears per layer, the head and the embedding; none left whole
    for a, b in zip(run([]), chunked):
        assert torch.equal(a, b)


def test_hf_trainer_gradient_release_callback_refuses_ddp():
    """On several ranks the Trainer gives callbacks the unwrapped model; without FSDP2 that is DDP, whose
    averaging comes after the release hooks have stepped each rank's local gradient. Refused before
    anything is hooked (the Trainer's arguments stood in for: the checks read four of them)."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    from types import SimpleNamespace

    from dist8.integrations.hf_trainer import GradientReleaseCallback

    model = nn.Linear(8, 8)
    opt = dist8.AdamW8bit(model.parameters())
    args = SimpleNamespace(max_grad_norm=0.0, gradient_accumulation_steps=1, world_size=2, fp16=False)
    with pytest.raises(ValueError, match=r"^GradientReleaseCallback on 2 ranks needs an FSDP2 model: under DDP"):
        GradientReleaseCallback().on_train_begin(args, None, None, model=model, optimizer=opt)
    assert "step" not in opt.__dict__  # nothing hooked
    args.world_size = 1
    callback = GradientReleaseCallback()
    callback.on_train_begin(args, None, None, model=model, optimizer=opt)
    assert "step" in opt.__dict__
    callback.on_train_end(args, None, None)
    assert "step" not in opt.__dict__


# ---- HF Trainer with a DeepSpeed config that names dist8 ---------------------------------------------
def _hf_deepspeed_run(rank, world, out_dir, stage):
    """Train 6 steps saving at 3, then resume from step 3 in a new Trainer; DeepSpeed builds the
    optimizer from the config's ``"type": "dist8.AdamW8bit"`` (HF fills the "auto" values)."""
    import dist8.integrations.deepspeed  # noqa: F401  (the one import the README asks for)
    from transformers import Trainer

    ds_config = {
        "optimizer": {"type": "dist8.AdamW8bit", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                            "weight_decay": "auto", "min_8bit_size": 1024}},
        "zero_optimization": {"stage": stage}, "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    }
    out = {}
    for name, resume in (("full", None), ("resumed", os.path.join(out_dir, "full", "checkpoint-3"))):
        args = _training_args(os.path.join(out_dir, name), learning_rate=3e-3, deepspeed=ds_config)
        trainer = Trainer(model=_tiny_gpt2(), args=args, train_dataset=_Tokens())
        trainer.train(resume_from_checkpoint=resume)
        basic = trainer.deepspeed.basic_optimizer
        out[name] = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                     "class": type(basic).__name__, "wrapper": type(trainer.deepspeed.optimizer).__name__,
                     "dtypes": sorted({str(v) for v in basic.state_dtypes().values()}),
                     "params": [p.detach().clone() for p in trainer.model.parameters()]}
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_with_a_deepspeed_config_naming_dist8_resumes_exactly(tmp_path, monkeypatch, stage):
    """``TrainingArguments(deepspeed={... "optimizer": {"type": "dist8.AdamW8bit", "params": {"lr": "auto", ...}}})``:
    DeepSpeed builds dist8's optimizer inside its ZeRO wrapper, with 8-bit state for the matrices,
    and ``resume_from_checkpoint`` (DeepSpeed's own checkpoint, through the Trainer) continues
    exactly: the same losses and the same weights as the uninterrupted run."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    pytest.importorskip("deepspeed", reason="deepspeed is in the [test] extras")
    for key, value in {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)  # what torchrun / the deepspeed launcher set for one rank
    out_dir = tmp_path / "hf-ds"
    out_dir.mkdir()
    (result,) = run_ranks(_hf_deepspeed_run, 1, str(out_dir), stage, tmp_path=tmp_path)
    full, resumed = result["full"], result["resumed"]
    assert not any(torch.equal(a, b) for a, b in zip(full["params"], _tiny_gpt2().parameters()))  # trained
    assert full["class"] == resumed["class"] == "AdamW8bit"
    assert full["wrapper"] == ("DeepSpeedZeroOptimizer" if stage < 3 else "DeepSpeedZeroOptimizer_Stage3")
    assert full["dtypes"] == ["torch.float32", "torch.uint8"]  # matrices 8-bit, LayerNorms and biases 32-bit
    assert len(full["losses"]) == 6 and resumed["losses"] == full["losses"]
    assert all(torch.equal(a, b) for a, b in zip(full["params"], resumed["params"]))


# ---- HF Trainer's DDP with dist8.ShardedOptimizer (ZeRO-1) -----------------------------------------------
def _hf_ddp_zero(rank, world_size, out_dir, resume_from):
    import os
    import warnings

    from transformers import Trainer

    from dist8.integrations.hf_trainer import ShardedStateDictCallback
    from dist8.shard import ShardedOptimizer

    warnings.simplefilter("ignore")
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # torchrun's, beside run_ranks'
    model = _tiny_gpt2()
    initial = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=_training_args(out_dir, 6, use_cpu=True, ddp_backend="gloo"),
                      train_dataset=_Tokens(), callbacks=[ShardedStateDictCallback()],
                      optimizer_cls_and_kwargs=(ShardedOptimizer, {"optimizer_class": dist8.AdamW8bit, "stage": 1,
                                                                   "full_state_dict": True, "lr": 3e-3,
                                                                   "min_8bit_size": 1024}))
    trainer.train(resume_from_checkpoint=resume_from)
    params = [p.detach().clone() for p in trainer.model.parameters()]
    return {"wrapped": type(trainer.model_wrapped).__name__, "optimizer": type(_opt(trainer)).__name__,
            "params": params, "trained": [not torch.equal(a, b) for a, b in zip(initial, params)]}


def _hf_ddp_zero_saving_per_epoch(rank, world_size, out_dir):
    import faulthandler
    import os
    import warnings

    from transformers import Trainer, TrainingArguments

    from dist8.integrations.hf_trainer import ShardedStateDictCallback
    from dist8.shard import ShardedOptimizer

    faulthandler.dump_traceback_later(240, exit=True)  # rank 0 left waiting at the save: a failure, not a hang
    warnings.simplefilter("ignore")
    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    args = TrainingArguments(output_dir=out_dir, num_train_epochs=1, per_device_train_batch_size=4,
                             save_strategy="epoch", report_to=[], seed=0, disable_tqdm=True, use_cpu=True,
                             ddp_backend="gloo")
    trainer = Trainer(model=_tiny_gpt2(), args=args, train_dataset=_Tokens(), callbacks=[ShardedStateDictCallback()],
                      optimizer_cls_and_kwargs=(ShardedOptimizer, {"optimizer_class": dist8.AdamW8bit, "stage": 1,
                                                                   "full_state_dict": True, "lr": 3e-3}))
    trainer.train()
    return trainer.state.global_step


def test_hf_trainer_ddp_with_sharded_optimizer_saves_per_epoch(tmp_path):
    """``save_strategy="epoch"`` decides to save in ``on_epoch_end``, after the callback's ``on_step_end``: the
    state was not gathered and rank 0's save waited for the other ranks forever. The callback gathers there too."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    steps = run_ranks(_hf_ddp_zero_saving_per_epoch, 2, str(tmp_path / "epoch"), tmp_path=tmp_path)
    saved = torch.load(tmp_path / "epoch" / f"checkpoint-{steps[0]}" / "optimizer.pt", weights_only=True)
    assert steps == [6, 6] and any(st["state1"].dtype == torch.uint8 for st in saved["state"].values())


def test_hf_trainer_ddp_with_sharded_optimizer_resumes_bitwise(tmp_path):
    """HF Trainer saves rank 0's ``optimizer.state_dict()`` only: ``ShardedOptimizer(full_state_dict=True)``
    with ``ShardedStateDictCallback`` (which gathers the state on every rank before each save, so rank 0's
    call needs no collective) gives a checkpoint with every rank's blocks, and 2 DDP ranks resume bitwise.
    Without ``full_state_dict=True`` the callback refuses at the start of training."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    from dist8.integrations.hf_trainer import ShardedStateDictCallback
    from dist8.shard import ShardedOptimizer

    full = run_ranks(_hf_ddp_zero, 2, str(tmp_path / "full"), None, tmp_path=tmp_path)
    assert full[0]["wrapped"] == "DistributedDataParallel" and full[0]["optimizer"] == "ShardedOptimizer"
    # the Trainer's accelerate prepare() copies every parameter after the optimizer is built
    # (model.to("cpu:0")): until 2026-12-02 the model never trained and both runs were the initial model
    assert all(r["trained"][0] and sum(r["trained"]) >= len(r["trained"]) - 2 for r in full), full[0]["trained"]
    saved = torch.load(tmp_path / "full" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert any(st["state1"].dtype == torch.uint8 and st["state1"].dim() == 2 for st in saved["state"].values())
    resumed = run_ranks(_hf_ddp_zero, 2, str(tmp_path / "resumed"), str(tmp_path / "full" / "checkpoint-3"),
                        tmp_path=tmp_path)
    for a, b in zip(full, resumed):
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    shard_mode = ShardedOptimizer([torch.nn.Parameter(torch.zeros(8))], dist8.AdamW8bit)
    shard_mode.world_size = 2  # as on a rank of two (the refusal is decided before any collective)
    with pytest.raises(ValueError, match="needs full_state_dict=True"):
        ShardedStateDictCallback().on_train_begin(None, None, None, optimizer=shard_mode)
