"""Model + optimizer wiring for each ``sharding.mode``.

Every mode returns an :class:`Engine` with the same small surface, so the
training loop never branches on the mode:

``ddp``          torch DDP (skipped at world size 1) + the optimizer on every rank
``dist8-zero1``  DDP + :class:`dist8.shard.ShardedOptimizer` (stage 1)
``dist8-zero2``  no DDP; ShardedOptimizer (stage 2) reduce-scatters grads in hooks
``fsdp2``        adapter to ``dist8.integrations.fsdp`` (see :func:`_adapter_fsdp2`)
``deepspeed``    adapter to ``dist8.integrations.deepspeed`` (see :func:`_adapter_deepspeed`)

:func:`check_mode_available` runs before any process group exists, so a mode
that is not installed fails with one line and exit code 2.
"""
from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from dist8.train.config import Config, ConfigError, optimizer_class

__all__ = ["Engine", "build_engine", "check_mode_available", "install_gradient_release", "optimizer_state_nbytes",
           "skip_counter"]


@dataclass
class Engine:
    """What the loop needs: forward module, backward/step/zero_grad, accumulation and clipping."""

    model: nn.Module  # called for forward (may be a wrapper)
    raw_model: nn.Module  # the unwrapped module (checkpoints, parameter names)
    optimizer: Any
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    clip_grad_norm: Callable[[float], float | None] | None = None
    backward: Callable[[torch.Tensor], None] = field(default=lambda loss: loss.backward())
    step: Callable[[], None] | None = None
    zero_grad: Callable[[], None] | None = None
    description: str = ""
    # True when the wrapper accumulates itself (DeepSpeed): the loop then calls
    # backward(loss) unscaled and step() after every micro-batch, and reads the
    # gradient norm after step().
    owns_accumulation: bool = False
    # dist8.gradient_release handle when train.gradient_release is on (step/zero_grad are no-ops then).
    release: Any = None
    # Reads the dist8 optimizer's cumulative count of skipped inf/NaN blocks; None for torch's optimizers.
    nonfinite_skips: Callable[[], int] | None = None

    def __post_init__(self) -> None:
        if self.step is None:
            self.step = self.optimizer.step
        if self.zero_grad is None:
            self.zero_grad = lambda: self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_skips is None:
            self.nonfinite_skips = skip_counter(self.optimizer)
        if self.clip_grad_norm is None:
            params = [p for p in self.raw_model.parameters() if p.requires_grad]
            self.clip_grad_norm = lambda max_norm: float(
                torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
            )

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def skip_counter(optimizer: Any) -> Callable[[], int] | None:
    """Reads ``optimizer.nonfinite_skips`` (a dist8 optimizer's skipped inf/NaN blocks), or None for one without it."""
    return (lambda: optimizer.nonfinite_skips) if hasattr(optimizer, "nonfinite_skips") else None


def optimizer_state_nbytes(optimizer: Any) -> int:
    """Bytes of optimizer state held on this rank (``state_nbytes()`` when the optimizer has it)."""
    fn = getattr(optimizer, "state_nbytes", None)
    if not callable(fn):  # DeepSpeed's ZeRO optimizers wrap the dist8 optimizer as .optimizer
        fn = getattr(getattr(optimizer, "optimizer", None), "state_nbytes", None)
    if callable(fn):
        return int(fn())
    total = 0
    for st in getattr(optimizer, "state", {}).values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def _import(name: str, attr: str | None = None) -> Any:
    module = importlib.import_module(name)
    if attr is not None and not hasattr(module, attr):
        raise ImportError(f"{name} has no {attr}")
    return getattr(module, attr) if attr else module


def check_mode_available(cfg: Config) -> None:
    """Raise ConfigError('... mode not available: ...') unless the sharding mode can run here."""
    mode = cfg.sharding.mode
    needs = {
        "ddp": [],
        "dist8-zero1": [("dist8.shard", "ShardedOptimizer")],
        "dist8-zero2": [("dist8.shard", "ShardedOptimizer")],
        "fsdp2": [("dist8.integrations.fsdp", None), ("torch.distributed.fsdp", "fully_shard")],
        "deepspeed": [("dist8.integrations.deepspeed", None), ("deepspeed", None)],
    }[mode]
    for module, attr in needs:
        try:
            _import(module, attr)
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            what = f"{module}.{attr}" if attr else module
            why = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(f"sharding.mode {mode!r}: mode not available: cannot import {what} ({why})") from None
    if mode in ("dist8-zero1", "dist8-zero2") and cfg.optimizer.name.lower().startswith("torch."):
        raise ConfigError(f"sharding.mode {mode!r} shards dist8 optimizers only; optimizer.name is "
                          f"{cfg.optimizer.name!r} (use mode ddp for the torch baseline)")
    if mode == "deepspeed":
        path = cfg.sharding.deepspeed_config
        if not path:
            raise ConfigError("sharding.mode 'deepspeed' needs sharding.deepspeed_config (a DeepSpeed JSON config path)")
        import os

        if not os.path.isfile(path):
            raise ConfigError(f"config key sharding.deepspeed_config: {path!r} does not exist")


def build_engine(cfg: Config, model: nn.Module, device: torch.device) -> Engine:
    """Wrap ``model`` (already on ``device``) and build the optimizer for ``cfg.sharding.mode``.

    With ``train.gradient_release`` the DDP-on-several-ranks refusal happens here; the release
    itself is installed by :func:`install_gradient_release` once a checkpoint is loaded.
    """
    engine = _build_engine(cfg, model, device)
    if cfg.train.gradient_release:
        if isinstance(engine.model, nn.parallel.DistributedDataParallel):
            raise ConfigError("config key train.gradient_release is incompatible with sharding.mode ddp on several "
                              "ranks (DDP averages gradients after the hooks would step); use sharding.mode fsdp2")
        engine.description += " + gradient release"
    return engine


def install_gradient_release(engine: Engine, weight_grad_chunk: int | None = None) -> None:
    """Step each parameter inside backward (:func:`dist8.gradient_release`); the loop's ``step`` and
    ``zero_grad`` become no-ops. Called after resuming: loading optimizer state (DCP's
    ``set_optimizer_state_dict`` steps the optimizer on zero gradients to create state) must see
    the normal ``step``/``zero_grad``. ``weight_grad_chunk``: ``train.weight_grad_chunk``."""
    from dist8.optim.release import gradient_release

    engine.optimizer.zero_grad(set_to_none=True)
    engine.release = gradient_release(engine.raw_model, engine.optimizer,
                                      weight_grad_chunk=weight_grad_chunk)
    engine.step = engine.optimizer.step  # the released (no-op) step


def _build_engine(cfg: Config, model: nn.Module, device: torch.device) -> Engine:
    mode = cfg.sharding.mode
    opt_cls = optimizer_class(cfg.optimizer.name)
    opt_args = dict(cfg.optimizer.args)
    opt_args["lr"] = cfg.train.lr
    world = dist.get_world_size() if dist.is_initialized() else 1
    if mode == "ddp":
        return _build_ddp(model, opt_cls, opt_args, device, world)
    if mode in ("dist8-zero1", "dist8-zero2"):
        return _build_zero(model, opt_cls, opt_args, device, world, stage=1 if mode == "dist8-zero1" else 2)
    if mode == "fsdp2":
        return _adapter_fsdp2(cfg, model, opt_cls, opt_args, device)
    if mode == "deepspeed":
        return _adapter_deepspeed(cfg, model, opt_cls, opt_args, device)
    raise ConfigError(f"config key sharding.mode: unknown mode {mode!r}")


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _build_ddp(model, opt_cls, opt_args, device, world) -> Engine:
    optimizer = opt_cls(list(model.named_parameters()), **opt_args)
    if world == 1:
        return Engine(model=model, raw_model=model, optimizer=optimizer, description="single process")
    wrapped = _ddp(model, device)
    return Engine(model=wrapped, raw_model=model, optimizer=optimizer, no_sync=wrapped.no_sync,
                  description=f"DDP x{world}")


def _build_zero(model, opt_cls, opt_args, device, world, stage: int) -> Engine:
    from dist8.shard import ShardedOptimizer

    optimizer = ShardedOptimizer(list(model.named_parameters()), opt_cls, stage=stage, process_group=None, **opt_args)
    clip = getattr(optimizer, "clip_grad_norm", None)
    clip_fn = (lambda max_norm: float(clip(max_norm if max_norm > 0 else float("inf")))) if clip else None
    if stage == 1 and world > 1:
        wrapped = _ddp(model, device)
        return Engine(model=wrapped, raw_model=model, optimizer=optimizer, no_sync=wrapped.no_sync,
                      clip_grad_norm=clip_fn, description=f"DDP + dist8 ZeRO-1 x{world}")
    no_sync = getattr(optimizer, "no_sync", contextlib.nullcontext)
    return Engine(model=model, raw_model=model, optimizer=optimizer, no_sync=no_sync, clip_grad_norm=clip_fn,
                  description=f"dist8 ZeRO-{stage} x{world}")


# ---- adapters to integrations built elsewhere in dist8 ---------------------------------------
# ADAPTER(fsdp2): the only place the training job touches dist8.integrations.fsdp.
def _adapter_fsdp2(cfg: Config, model: nn.Module, opt_cls, opt_args, device) -> Engine:
    """FSDP2: ``dist8.integrations.fsdp.fully_shard`` on each block and the root, then a dist8
    optimizer directly on the DTensor parameters (it updates the local shards).
    Checkpoints go through ``fsdp.save_dcp`` / ``load_dcp`` (see :mod:`dist8.train.checkpointing`)."""
    from dist8.integrations import fsdp

    # FSDP2 groups need one dtype: fsdp.fully_shard gives the norm layers cast_model kept fp32 their own
    for block in model.blocks:
        fsdp.fully_shard(block)
    fsdp.fully_shard(model)
    fsdp.prepare(model)
    optimizer = opt_cls(list(model.named_parameters()), **opt_args)

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return Engine(model=model, raw_model=model, optimizer=optimizer, no_sync=no_sync,
                  description=f"FSDP2 x{dist.get_world_size()}")


# ADAPTER(deepspeed): the only place the training job touches deepspeed / dist8.integrations.deepspeed.
def _adapter_deepspeed(cfg: Config, model: nn.Module, opt_cls, opt_args, device) -> Engine:
    """DeepSpeed ZeRO: the engine owns backward, step (with clipping) and accumulation.

    Batch sizes and clipping in the JSON config are overridden from ``train.*`` so the
    two cannot disagree. The dist8 optimizer instance goes through
    ``dist8.integrations.deepspeed.initialize(...)`` (per-parameter state in ZeRO's flat partitions).
    """
    import json

    from dist8.integrations.deepspeed import initialize as deepspeed_initialize

    with open(cfg.sharding.deepspeed_config, encoding="utf-8") as f:
        ds_config = json.load(f)
    t = cfg.train
    ds_config.update(train_micro_batch_size_per_gpu=t.batch_size, gradient_accumulation_steps=t.grad_accum,
                     gradient_clipping=t.clip)
    ds_config.pop("train_batch_size", None)
    ds_config.pop("optimizer", None)
    optimizer = opt_cls(list(model.named_parameters()), **opt_args)
    engine, ds_optimizer, _, _ = deepspeed_initialize(model=model, optimizer=optimizer, config=ds_config)

    def clip_fn(_max_norm: float) -> float | None:  # deepspeed clips inside step(); report its norm
        norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        return float(norm) if norm is not None else None

    return Engine(model=engine, raw_model=engine.module, optimizer=ds_optimizer or optimizer,
                  backward=engine.backward, step=engine.step, zero_grad=lambda: None,
                  clip_grad_norm=clip_fn, owns_accumulation=True,
                  nonfinite_skips=skip_counter(optimizer),  # the dist8 optimizer inside DeepSpeed's wrapper
                  description=f"DeepSpeed x{dist.get_world_size()}")
