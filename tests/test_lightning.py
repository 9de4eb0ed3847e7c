"""PyTorch Lightning as a client: a dist8 optimizer returned by ``configure_optimizers`` (Trainer)
or passed to ``Fabric.setup``, used the way Lightning's users use it.

* resuming from a ``ModelCheckpoint`` file (``fit(ckpt_path=...)``, also with
  ``weights_only=True``) continues bitwise, with the 8-bit state in the file;
* mixed precision with ``gradient_clip_val``: Lightning refuses to clip for optimizers that
  unscale inside ``step()`` (``_step_supports_amp_scaling``, dist8's default like torch's
  fused AdamW); ``amp_unscale="scaler"`` makes dist8 a non-fused optimizer to the scaler, and
  ``16-mixed`` with clipping and an overflowing step then equals the plain torch.amp loop bitwise;
* Fabric: ``fabric.save``/``fabric.load`` of the optimizer resumes bitwise under ``bf16-mixed``
  with ``fabric.clip_gradients``;
* ``ModelParallelStrategy`` (FSDP2, and FSDP + TP on a 2x2 mesh, in ``configure_model``): resuming
  from its DCP folder or full file is bitwise, and one rank loads the state exactly (this found the
  empty-shard bug of a ``Linear(128, 1)`` on 2 ranks, docs/design.md "FSDP2");
* DDP with ``dist8.ShardedOptimizer(full_state_dict=True)``: rank 0's checkpoint holds every rank's
  blocks and resumes bitwise on 2 ranks, and on 1.

Lightning resumes an epoch from its start (its data loaders are not stateful), so the
resumed runs here use one batch per epoch: every checkpoint is on an epoch boundary.
"""
import warnings

import pytest
import torch
from torch import nn

import dist8

L = pytest.importorskip("lightning", reason="lightning is in the [test] extras")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

SCALE = 2.0**10


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers, loggers and litlogger
        yield


def _data(n=32):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 32, generator=gen), torch.randn(n, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)


def _net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 1))


def _optimizer(params, **kw):
    return dist8.AdamW8bit(params, lr=1e-3, weight_decay=0.01, min_8bit_size=0, **kw)


class _Module(L.LightningModule):
    def __init__(self, opt_kw=None, nan_at=None):
        super().__init__()
        self.net = _net()
        self.opt_kw = opt_kw or {}
        self.nan_at = nan_at
        self.losses = []

    def training_step(self, batch, _):
        loss = nn.functional.mse_loss(self.net(batch[0]).float(), batch[1])
        self.losses.append(loss.item())
        return loss

    def on_after_backward(self):
        if self.global_step == self.nan_at:
            self.net[0].bias.grad[0] = float("nan")

    def configure_optimizers(self):
        opt = _optimizer(self.parameters(), **self.opt_kw)
        sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _trainer(steps, **kw):
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("devices", 1)
    return L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, **kw)


@pytest.mark.parametrize("weights_only", [False, True])
def test_resume_from_a_model_checkpoint_continues_bitwise(tmp_path, weights_only):
    full = _Module()
    _trainer(8, callbacks=[ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=-1)],
             enable_checkpointing=True).fit(full, _data())
    ckpt = tmp_path / "epoch=3-step=4.ckpt"
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["state"]
    assert {v["state1"].dtype for v in saved.values()} == {torch.uint8}  # the 8-bit codes are in the file
    resumed = _Module()
    _trainer(8).fit(resumed, _data(), ckpt_path=ckpt, weights_only=weights_only)
    assert resumed.losses == full.losses[4:]
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_gradient_clipping_under_16_mixed_is_refused_by_lightning_for_the_default():
    """Lightning's own refusal (also torch's fused AdamW's): why ``amp_unscale="scaler"`` exists."""
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    trainer = _trainer(2, plugins=[MixedPrecision("16-mixed", "cpu", scaler)], gradient_clip_val=0.5)
    with pytest.raises(RuntimeError, match="AdamW8bit, does not allow for gradient clipping"):
        trainer.fit(_Module(), _data())


def _plain_loop(steps, dtype, clip, scaler=None, nan_at=None):
    """What Lightning does for one optimizer with a step-interval scheduler, written out with torch.amp."""
    net = _net()
    opt = _optimizer(net.parameters(), amp_unscale="scaler")
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    x, y = next(iter(_data()))
    losses = []
    for step in range(steps):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            loss = nn.functional.mse_loss(net(x).float(), y)
        losses.append(loss.item())
        (scaler.scale(loss) if scaler else loss).backward()
        if step == nan_at:
            net[0].bias.grad[0] = float("nan")
        if scaler:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(net.parameters(), clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
    return net, losses


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_with_gradient_clipping_and_scaler_unscaling(precision):
    """``amp_unscale="scaler"``: Lightning unscales, clips and (16-mixed) lets the scaler skip an overflowing
    step; bitwise the plain torch.amp loop. (bf16-mixed has no scaler; Lightning up to 2.6 refuses to clip
    there too for the default, a check it has since relaxed.)"""
    if precision == "16-mixed":
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        kw = dict(plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
        ref, ref_losses = _plain_loop(6, torch.float16, 0.5, torch.amp.GradScaler("cpu", init_scale=SCALE), nan_at=2)
    else:
        scaler, kw = None, dict(precision="bf16-mixed")
        ref, ref_losses = _plain_loop(6, torch.bfloat16, 0.5)
    module = _Module(opt_kw=dict(amp_unscale="scaler"), nan_at=2 if scaler else None)
    _trainer(6, gradient_clip_val=0.5, **kw).fit(module, _data())
    assert module.losses == ref_losses
    for a, b in zip(module.net.parameters(), ref.parameters()):
        assert torch.equal(a, b)
    if scaler:
        assert scaler.get_scale() == SCALE / 2 and module.optimizers().optimizer.amp_skips == 0


def _fabric_run(tmp_path, steps, save_at=None, load=False):
    fabric = L.Fabric(accelerator="cpu", devices=1, precision="bf16-mixed")
    net = _net()
    opt = _optimizer(net.parameters())
    net, opt = fabric.setup(net, opt)
    state = {"model": net, "optimizer": opt, "step": 0}
    if load:
        fabric.load(tmp_path / "fabric.ckpt", state, weights_only=True)
    x, y = next(iter(_data()))
    losses = []
    for step in range(state["step"], steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x).float(), y)
        losses.append(loss.item())
        fabric.backward(loss)
        fabric.clip_gradients(net, opt, max_norm=0.5)
        opt.step()
        if step + 1 == save_at:
            state["step"] = save_at
            fabric.save(tmp_path / "fabric.ckpt", state)
    return net, losses


def test_fabric_save_and_load_resume_bitwise(tmp_path):
    full, full_losses = _fabric_run(tmp_path, 6, save_at=3)
    resumed, losses = _fabric_run(tmp_path, 6, load=True)
    assert losses == full_losses[3:]
    for a, b, initial in zip(full.parameters(), resumed.parameters(), _net().parameters()):
        assert torch.equal(a, b) and not torch.equal(a, initial)  # equal, and trained


# ---- ModelParallelStrategy (FSDP2, FSDP + TP) on gloo ranks ---------------------------------------
class _ShardedModule(_Module):
    """FSDP2 through Lightning's ModelParallelStrategy: ``configure_model`` shards each layer and the root."""

    def __init__(self, record_at=None):
        super().__init__()
        self.record_at = record_at
        self.recorded = None

    def configure_model(self):
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        if self.device_mesh["tensor_parallel"].size() > 1:  # FSDP + TP, torchtitan's 2-D layout
            parallelize_module(self.net, self.device_mesh["tensor_parallel"],
                               {"0": ColwiseParallel(), "2": RowwiseParallel()})
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.net[0], self.net[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def _record(self):  # the optimizer's global state (a collective: every rank records)
        state = self.optimizers().optimizer.state_dict()["state"]
        names = [name for name, _ in self.net.named_parameters()]
        # clone: on one rank full_tensor() is the live state, which the next steps change
        self.recorded = {names[i]: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                                    if torch.is_tensor(v) else v for k, v in st.items()}
                         for i, st in state.items()}

    def on_train_batch_start(self, batch, i):
        if self.global_step == self.record_at:  # the state the step about to run starts from
            self._record()


def _as_torchrun_rank(rank, world_size):
    """torchrun's environment in a run_ranks rank: Lightning joins the process group already made
    instead of launching processes of its own."""
    import os

    os.environ.update(TORCHELASTIC_RUN_ID="dist8", LOCAL_RANK=str(rank), GROUP_RANK="0",
                      LOCAL_WORLD_SIZE=str(world_size))
    warnings.simplefilter("ignore")


def _lightning_fsdp2(rank, world_size, ckpt_dir, distributed_ckpt, resume_from, record_at, tp=1):
    from lightning.pytorch.strategies import ModelParallelStrategy

    _as_torchrun_rank(rank, world_size)
    module = _ShardedModule(record_at=record_at)
    strategy = ModelParallelStrategy(data_parallel_size=world_size // tp, tensor_parallel_size=tp,
                                     save_distributed_checkpoint=distributed_ckpt)
    callbacks = [] if resume_from else [ModelCheckpoint(ckpt_dir, every_n_epochs=1, save_top_k=-1)]
    _trainer(8, devices=world_size, strategy=strategy, callbacks=callbacks,
             enable_checkpointing=not resume_from).fit(module, _data(), ckpt_path=resume_from)
    opt = module.optimizers().optimizer
    return {"losses": module.losses, "recorded": module.recorded, "class": type(opt).__name__,
            "params": {n: p.full_tensor() for n, p in module.net.named_parameters()},
            "placements": {n: str(p.placements) for n, p in module.net.named_parameters()}}


@pytest.mark.parametrize("ranks,tp,distributed_ckpt", [(2, 1, True), (2, 1, False), (4, 2, True)],
                         ids=["fsdp-dcp", "fsdp-full-file", "fsdp+tp-dcp"])
def test_model_parallel_strategy_resumes_bitwise_and_at_another_world_size(tmp_path, ranks, tp, distributed_ckpt):
    """FSDP2 on 2 ranks, or FSDP + TP on 2x2 ranks, save (a DCP folder per rank, or one full file from
    rank 0); as many ranks resume bitwise, and 1 rank loads exactly the state they had at that step."""
    from dist_utils import run_ranks

    ckpt_dir = str(tmp_path / "ckpt")
    full = run_ranks(_lightning_fsdp2, ranks, ckpt_dir, distributed_ckpt, None, 4, tp, tmp_path=tmp_path)
    ckpt = str(tmp_path / "ckpt" / "epoch=3-step=4.ckpt")
    resumed = run_ranks(_lightning_fsdp2, ranks, ckpt_dir, distributed_ckpt, ckpt, 4, tp, tmp_path=tmp_path)
    if tp > 1:
        assert full[0]["placements"]["0.weight"] == "(_StridedShard(dim=0, sf=2), Shard(dim=0))"
    for a, b in zip(full, resumed):
        assert b["losses"] == a["losses"][4:]
        for n in a["params"]:
            assert torch.equal(a["params"][n], b["params"][n]), n
    (single,) = run_ranks(_lightning_fsdp2, 1, ckpt_dir, distributed_ckpt, ckpt, 4, tmp_path=tmp_path)
    assert single["class"] == "AdamW8bit"
    for name, state in full[0]["recorded"].items():
        for key, value in state.items():
            got = single["recorded"][name][key]
            assert (torch.equal(got, value) if torch.is_tensor(value) else got == value), f"{name} {key}"
    assert {v["state1"].dtype for v in single["recorded"].values()} == {torch.uint8}


# ---- DDP with dist8.ShardedOptimizer (ZeRO-1) ---------------------------------------------------------
class _ZeroModule(_Module):
    def configure_optimizers(self):
        from dist8.shard import ShardedOptimizer

        return ShardedOptimizer(self.named_parameters(), dist8.AdamW8bit, stage=1, lr=1e-3, weight_decay=0.01,
                                min_8bit_size=0, full_state_dict=True)


def _lightning_ddp_zero(rank, world_size, ckpt_dir, resume_from):
    _as_torchrun_rank(rank, world_size)
    module = _ZeroModule()
    initial = [p.detach().clone() for p in module.parameters()]
    callbacks = [] if resume_from else [ModelCheckpoint(ckpt_dir, every_n_epochs=1, save_top_k=-1)]
    _trainer(6, devices=world_size, strategy="ddp", callbacks=callbacks,
             enable_checkpointing=not resume_from).fit(module, _data(), ckpt_path=resume_from)
    params = [p.detach().clone() for p in module.parameters()]
    return {"losses": module.losses, "params": params,
            "trained": all(not torch.equal(a, b) for a, b in zip(initial, params))}


def test_ddp_with_sharded_optimizer_resumes_from_rank_0s_checkpoint(tmp_path):
    """Lightning's DDP saves rank 0's ``optimizer.state_dict()`` and loads it on every rank: with
    ``ShardedOptimizer(full_state_dict=True)`` that is the whole quantized state, so 2 ranks resume
    bitwise and 1 rank resumes too. (A shard state dict, the default, is refused on rank 1 naming the
    option: tests/test_sharded.py.)"""
    from dist_utils import run_ranks

    ckpt_dir = str(tmp_path / "ckpt")
    full = run_ranks(_lightning_ddp_zero, 2, ckpt_dir, None, tmp_path=tmp_path)
    assert full[0]["trained"] and full[1]["trained"]  # (accelerate's and HF's did not, until 2026-12-02)
    ckpt = str(tmp_path / "ckpt" / "epoch=2-step=3.ckpt")
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]
    assert saved["state"][0]["state1"].dtype == torch.uint8 and saved["state"][0]["state1"].shape == (128, 32)
    resumed = run_ranks(_lightning_ddp_zero, 2, ckpt_dir, ckpt, tmp_path=tmp_path)
    for a, b in zip(full, resumed):
        assert b["losses"] == a["losses"][3:]
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    (single,) = run_ranks(_lightning_ddp_zero, 1, ckpt_dir, ckpt, tmp_path=tmp_path)
    assert len(single["losses"]) == 3


class _Grads(L.Callback):
    """How many parameters hold a gradient right before each optimizer step (under gradient release: none)."""

    def __init__(self):
        self.counts = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.counts.append(sum(p.grad is not None for p in pl_module.parameters()))


def test_gradient_release_callback_is_the_normal_step_and_resumes_bitwise(tmp_path, recwarn):
    """``GradientReleaseCallback``: fit() with gradient release is bitwise fit() without it (LR scheduler
    included, no warning that optimizer.step was overridden), a run resumed from its ModelCheckpoint is
    bitwise the whole run, and the optimizer steps normally after fit()."""
    from dist8.integrations.lightning import GradientReleaseCallback

    normal, grads = _Module(), _Grads()
    _trainer(6, callbacks=[grads]).fit(normal, _data())
    released, release, grads_released = _Module(), GradientReleaseCallback(), _Grads()
    _trainer(6, callbacks=[release, grads_released, ModelCheckpoint(tmp_path, every_n_epochs=1, save_top_k=-1)],
             enable_checkpointing=True).fit(released, _data())
    assert not any("overridden" in str(w.message) for w in recwarn), [str(w.message) for w in recwarn]
    resumed, grads_resumed = _Module(), _Grads()
    _trainer(6, callbacks=[GradientReleaseCallback(), grads_resumed]).fit(
        resumed, _data(), ckpt_path=tmp_path / "epoch=2-step=3.ckpt")
    assert released.losses == normal.losses and resumed.losses == normal.losses[3:]
    for a, b, c in zip(normal.parameters(), released.parameters(), resumed.parameters()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert (grads.counts, grads_released.counts, grads_resumed.counts) == ([4] * 6, [0] * 6, [0] * 3)
    assert release.handle is None
    opt = released.trainer.optimizers[0]
    before = [p.detach().clone() for p in released.parameters()]
    for p in released.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # released no more
    assert not any(torch.equal(a, b) for a, b in zip(before, released.parameters()))


class _Finetuned(_Module):
    """The module BackboneFinetuning expects: a ``backbone`` it freezes, then unfreezes into a new param group."""

    def __init__(self):
        super().__init__()
        self.backbone = self.net[0]

    def configure_optimizers(self):
        return _optimizer([p for p in self.parameters() if p.requires_grad])


def test_gradient_release_callback_steps_the_group_backbone_finetuning_adds():
    """Lightning's ``BackboneFinetuning`` freezes the backbone, then at an epoch unfreezes it and adds it to the
    optimizer as a new param group (scaling its lr every epoch after). Under ``GradientReleaseCallback`` that
    group was never stepped (the release hooked only the parameters it found at the start, ``step()`` is a
    no-op), silently; it is hooked at the next forward now, and the run is bitwise the run without release."""
    from lightning.pytorch.callbacks import BackboneFinetuning

    from dist8.integrations.lightning import GradientReleaseCallback

    runs = []
    for release in (False, True):
        module = _Finetuned()
        start = module.backbone.weight.detach().clone()
        callbacks = [BackboneFinetuning(unfreeze_backbone_at_epoch=2)]
        callbacks += [GradientReleaseCallback()] if release else []
        _trainer(6, callbacks=callbacks).fit(module, _data())
        assert len(module.trainer.optimizers[0].param_groups) == 2  # the backbone's group was added
        assert not torch.equal(module.backbone.weight, start)  # and trained
        runs.append(module)
    normal, released = runs
    assert released.losses == normal.losses
    for a, b in zip(normal.parameters(), released.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting, match", [
    ({"gradient_clip_val": 1.0}, r"^GradientReleaseCallback needs Trainer\(gradient_clip_val=None\), got 1.0: "),
    ({"accumulate_grad_batches": 2}, r"^GradientReleaseCallback needs Trainer\(accumulate_grad_batches=1\), got 2"),
    ({"plugins": "fp16 scaler"}, r"^GradientReleaseCallback does not support Trainer\(precision='16-mixed'\)"),
])
def test_gradient_release_callback_refuses_settings_that_cannot_work(setting, match):
    """``gradient_clip_val`` under gradient release clipped nothing, silently (the run was bitwise the run
    without clipping: every gradient is stepped and freed inside backward); accumulation and the fp16
    scaler fail later or not at all. Each is refused when fitting starts, before any step, and the
    optimizer is left unreleased."""
    from dist8.integrations.lightning import GradientReleaseCallback

    if setting.get("plugins") == "fp16 scaler":  # on CPU Lightning turns precision="16-mixed" into bf16
        setting = {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=SCALE))]}
    module, release = _Module(), GradientReleaseCallback()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=match):
        _trainer(2, callbacks=[release], **setting).fit(module, _data())
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert release.handle is None
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    module.trainer.optimizers[0].step()  # not released: a normal step
    assert not any(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def _release_under_strategies(rank, world_size):
    from lightning.pytorch.strategies import ModelParallelStrategy

    from dist8.integrations.lightning import GradientReleaseCallback

    _as_torchrun_rank(rank, world_size)
    out = {}
    for name, release in (("normal", False), ("released", True)):
        module, grads = _ShardedModule(), _Grads()
        callbacks = [grads] + ([GradientReleaseCallback()] if release else [])
        _trainer(4, devices=world_size, strategy=ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1),
                 callbacks=callbacks).fit(module, _data())
        out[name] = {"losses": module.losses, "grads": grads.counts,
                     "params": {n: p.full_tensor() for n, p in module.net.named_parameters()}}
    try:
        _trainer(2, devices=world_size, strategy="ddp", callbacks=[GradientReleaseCallback()]).fit(_Module(), _data())
        out["ddp"] = None
    except ValueError as exc:
        out["ddp"] = str(exc)
    return out


def test_gradient_release_callback_under_fsdp2_and_refused_under_ddp(tmp_path):
    """The release callback on ModelParallelStrategy (FSDP2, 2 gloo ranks: the sharded 5-bytes-per-parameter
    setting) steps each local shard inside backward and is bitwise the normal FSDP2 run; under Lightning's
    DDP strategy it is refused when fitting starts, naming FSDP2."""
    from dist_utils import run_ranks

    for r in run_ranks(_release_under_strategies, 2, tmp_path=tmp_path):
        assert r["released"]["losses"] == r["normal"]["losses"]
        for n, p in r["normal"]["params"].items():
            assert torch.equal(p, r["released"]["params"][n]), n
        assert r["released"]["grads"] == [0] * 4 and all(c > 0 for c in r["normal"]["grads"])
        assert r["ddp"] is not None and r["ddp"].startswith("GradientReleaseCallback on 2 ranks needs an FSDP2 model")
