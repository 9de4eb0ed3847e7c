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


def check_mode_available(cfg: Config) -> list[str]:
    """Raise ConfigError('... mode not available: ...') unless the sharding mode can run here.

    Under ``deepspeed`` also reads and checks ``sharding.deepspeed_config`` (:func:`check_deepspeed_config`);
    returns notes for the user (its optimizer section, unused)."""
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
        return check_deepspeed_config(cfg)
    return []


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
    from dist8.integrations.deepspeed import initialize as deepspeed_initialize

    ds_config = _deepspeed_json(cfg)
    ds_config.pop("optimizer", None)  # checked to agree with the job's (check_deepspeed_config); the job's decides
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


def _job_values(cfg: Config) -> dict[str, tuple[str, Any]]:
    """The DeepSpeed JSON keys the job sets from its own config: ``{key: (the job's key, its value)}``."""
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": ("train.batch_size", t.batch_size),
            "gradient_accumulation_steps": ("train.grad_accum", t.grad_accum),
            "gradient_clipping": ("train.clip", t.clip)}


def _read_deepspeed_json(cfg: Config) -> dict[str, Any]:
    """``sharding.deepspeed_config`` as written (a JSON object, else a ConfigError naming the file)."""
    from dist8.integrations.deepspeed_config import load_config

    try:
        return load_config(cfg.sharding.deepspeed_config)
    except ValueError as exc:
        raise ConfigError(f"config key sharding.deepspeed_config: {' '.join(str(exc).split())}") from None


def _deepspeed_json(cfg: Config, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sharding.deepspeed_config`` (``raw``: as already read) with its batch sizes and clipping set from
    ``train.*`` so the two cannot disagree."""
    ds_config = dict(_read_deepspeed_json(cfg) if raw is None else raw)
    ds_config.update({key: value for key, (_, value) in _job_values(cfg).items()})
    ds_config.pop("train_batch_size", None)
    return ds_config


def check_deepspeed_config(cfg: Config) -> list[str]:
    """Refuse, in one line naming the file, a DeepSpeed JSON the job would not run as written: not a JSON
    object, a ``scheduler`` section (``train.lr``/``train.schedule`` set the learning rate), an ``optimizer``
    section that disagrees with the job's optimizer section (which decides), or a value DeepSpeed's own
    config check refuses (its multi-line pydantic report, once the model was built). Returns a note for an
    agreeing optimizer section: it is not used."""
    from dist8.integrations.deepspeed_config import resolve_auto

    path = cfg.sharding.deepspeed_config
    raw = _read_deepspeed_json(cfg)
    ds_config = _deepspeed_json(cfg, raw)
    if "scheduler" in ds_config:
        raise ConfigError(f"config key sharding.deepspeed_config: {path} has a 'scheduler' section; the job's "
                          "train.lr and train.schedule set the learning rate: remove it")
    notes = _check_deepspeed_optimizer(cfg, ds_config.pop("optimizer", None)) + _replaced_values(cfg, raw)
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(resolve_auto(ds_config))
    except (ValueError, TypeError, KeyError, AssertionError) as exc:  # pydantic's ValidationError is a ValueError
        raise ConfigError(f"config key sharding.deepspeed_config: DeepSpeed refuses {path}: "
                          f"{_deepspeed_refusal(exc)}") from None
    return notes


def _deepspeed_refusal(exc: BaseException) -> str:
    """One line for DeepSpeed's config error: a pydantic report's first error (model.field: why, the value)."""
    errors = getattr(exc, "errors", None)
    try:
        found = errors() if callable(errors) else []
    except Exception:  # noqa: BLE001 - not pydantic's: fall back to the text
        found = []
    if not found:
        return " ".join(str(exc).split())[:300] or type(exc).__name__
    first = found[0]
    where = ".".join([getattr(exc, "title", "config"), *(str(part) for part in first.get("loc", ()))])
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    return f"{where}: {first.get('msg')}, got {first.get('input')!r}{more}"


def _replaced_values(cfg: Config, raw: dict[str, Any]) -> list[str]:
    """A note for each batch-size or clipping value of the DeepSpeed JSON as written (``raw``) that the job
    replaces with its own ``train.*`` (they were replaced without a word)."""
    path = cfg.sharding.deepspeed_config
    notes = [f"sharding.deepspeed_config {path}: its {key} {raw[key]!r} is replaced by the job's {name} {value!r}"
             for key, (name, value) in _job_values(cfg).items()
             if key in raw and raw[key] != "auto" and not _same_value(raw[key], value)]
    if raw.get("train_batch_size") not in (None, "auto"):
        notes.append(f"sharding.deepspeed_config {path}: its train_batch_size {raw['train_batch_size']!r} is not used; "
                     "train.batch_size x train.grad_accum x ranks decide")
    return notes


_DS_DECIDES = "the job's optimizer section (optimizer.name, optimizer.args) and train.lr decide"


def _check_deepspeed_optimizer(cfg: Config, section: Any) -> list[str]:
    """The DeepSpeed JSON's ``optimizer`` section must agree with the job's (type and every parameter but
    ``lr``): it used to be dropped without a word, so ``dist8.Lion8bit`` with a bogus key trained AdamW8bit."""
    if section is None:
        return []
    from dist8.integrations.deepspeed_config import is_dist8_type, optimizer_kwargs
    from dist8.optim import get_optimizer_class

    path = cfg.sharding.deepspeed_config
    where = f"config key sharding.deepspeed_config: {path}: its optimizer section"
    job_cls = optimizer_class(cfg.optimizer.name)
    kind = section.get("type") if isinstance(section, dict) else section
    if cfg.optimizer.name.lower().startswith("torch."):  # the fp32 baseline of a dist8 config: as its dist8-only args
        return [f"sharding.deepspeed_config {path}: its optimizer section ({kind}) does not apply to "
                f"{cfg.optimizer.name}; not used"]
    try:
        ds_cls = get_optimizer_class(kind) if is_dist8_type(kind) else None
    except ValueError:
        ds_cls = None
    if ds_cls is not job_cls:
        raise ConfigError(f"{where} names {kind!r}, but the job trains optimizer.name {cfg.optimizer.name}; "
                          f"{_DS_DECIDES}: remove the section")
    try:
        kwargs = optimizer_kwargs(ds_cls, section.get("params"))
    except ValueError as exc:
        raise ConfigError(f"{where}: {' '.join(str(exc).split())}; {_DS_DECIDES}: remove the section") from None
    for key, value in kwargs.items():
        job_value = cfg.optimizer.args.get(key, _default_of(job_cls, key))
        if key != "lr" and not _same_value(value, job_value):
            raise ConfigError(f"{where} sets params.{key} = {value!r}, but the job uses optimizer.args.{key} = "
                              f"{job_value!r}; {_DS_DECIDES}: remove the section or make it agree")
    lr = kwargs.get("lr")
    unused = f", nor its lr {lr:g} (train.lr {cfg.train.lr:g} and its schedule set it)" if lr is not None else ""
    return [f"sharding.deepspeed_config {path}: its optimizer section agrees with the job's and is not used{unused}; "
            f"{_DS_DECIDES}"]


def _default_of(cls: type, key: str) -> Any:
    """The default of keyword ``key`` of ``cls`` (its own ``__init__`` or a base class's); None if it has none."""
    import inspect

    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(key)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    return None


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config values: a JSON/YAML list equals a tuple with the same items."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    return a == b
