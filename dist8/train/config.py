"""Training configuration: YAML -> validated dataclasses (one concern: the schema and its checks).

Every section is a dataclass; unknown keys, wrong types and impossible values
raise :class:`ConfigError` with a one-line message that names the key (and,
for unknown keys, lists the valid keys of that section). ``--set a.b=value``
overrides are read as plain YAML data (:func:`dist8.train.yaml_io.load_yaml`: no aliases, bounded
size and depth).
"""
from __future__ import annotations

import dataclasses
import math
import os
import stat
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist8.train.yaml_io import MAX_BYTES, DuplicateKeyError, YamlError, load_yaml

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "OutputConfig",
    "ShardingConfig",
    "TrainConfig",
    "MODEL_DTYPES",
    "SHARDING_MODES",
    "FAULTS_ENV",
    "apply_overrides",
    "applicable_optimizer_args",
    "check_override_patterns",
    "config_to_dict",
    "fit_to_optimizer",
    "load_config",
]

MODEL_DTYPES = ("fp32", "bf16", "fp16")
SHARDING_MODES = ("ddp", "dist8-zero1", "dist8-zero2", "fsdp2", "deepspeed")
TORCH_OPTIMIZERS = ("torch.adamw", "torch.adam", "torch.sgd")
INT_LIMIT = 2**63
# The test-only train.fault_* keys (dist8.train.faults: SIGKILL a rank, NaN gradients) are refused unless the
# environment sets this to 1: a user config holding one would kill or corrupt a real run.
FAULTS_ENV = "DIST8_TRAIN_TEST_FAULTS"
# optimizer.args keys the job sets itself, anywhere in optimizer.args (overrides included): the value a
# config gave would replace the job's and the metrics would log the job's.
JOB_OWNED_ARGS = {"lr": "set the learning rate with train.lr (the schedule drives it)"}


class ConfigError(ValueError):
    """A bad configuration; the message is one line meant for the user."""


class TrainingDiverged(FloatingPointError):
    """The training loss became inf/NaN; the job stops with this one line (no traceback), like a ConfigError."""


@dataclass
class ModelConfig:
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    seq_len: int = 128
    stable_embedding: bool = True
    dtype: str = "fp32"  # parameter dtype: fp32 | bf16 | fp16 (dist8.cast_model; norm layers stay fp32)


@dataclass
class DataConfig:
    path: str | None = None  # None: the CPython standard library sources
    glob: str | None = None  # file pattern inside a directory; None: *.py for the stdlib, * otherwise
    max_bytes: int = 8_000_000
    val_fraction: float = 0.05


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16  # per rank, per micro-step
    grad_accum: int = 1
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr: float = 3e-4
    schedule: str = "cosine"
    clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 10
    # Step each parameter inside backward and free its gradient (dist8.gradient_release).
    gradient_release: bool = False
    # With gradient_release: nn.Linear/nn.Embedding weight gradients computed and stepped in chunks of about
    # this many elements inside backward (dist8.gradient_release(..., weight_grad_chunk=)); null: off.
    weight_grad_chunk: int | None = None
    # More than this many consecutive steps whose gradients hold inf/NaN stop the run (dist8.train.guards).
    max_nonfinite_steps: int = 10
    # Test-only fault injection (dist8.train.faults): rank ``fault_rank`` SIGKILLs itself right after step
    # ``fault_kill_step``; its loss gives NaN gradients in ``fault_nan_grad_count`` steps from ``fault_nan_grad_step``.
    fault_kill_step: int | None = None
    fault_nan_grad_step: int | None = None
    fault_nan_grad_count: int = 1
    fault_rank: int = 1


@dataclass
class OptimizerConfig:
    name: str = "AdamW8bit"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardingConfig:
    mode: str = "ddp"
    deepspeed_config: str | None = None


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: no checkpoints; "{optimizer}" is replaced by the optimizer name
    every: int = 0  # steps between checkpoints; 0: only at the end / on SIGTERM
    keep: int = 2


@dataclass
class OutputConfig:
    dir: str = "runs/tiny-gpt"  # "{optimizer}" is replaced by the optimizer name (lower case)
    plot: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# ---- parsing -------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is dict:
        return "mapping"
    return {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, getattr(tp, "__name__", str(tp)))


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (an error message stays one readable line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError:
                pass
        raise ConfigError(f"config key {where}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}")
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key {where}: expected a mapping, got {type(value).__name__} {_short(value)}")
        return dict(value)
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        if isinstance(value, int) and not isinstance(value, bool):
            value = float(value) if abs(value) < 2**1024 else (math.inf if value > 0 else -math.inf)  # float() would raise
        ok = isinstance(value, float)
    elif tp is str:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"config key {where}: expected {_type_name(tp)}, got {type(value).__name__} {_short(value)}")
    return value


def _mapping(raw: Any, what: str) -> dict:
    """``raw`` as a mapping (an empty YAML section is None), else a ConfigError: '<what>, got <type>'."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}, got {type(raw).__name__}")
    return raw


def _build_section(cls: type, raw: Any, section: str) -> Any:
    raw = _mapping(raw, f"config section {section!r} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            public = [n for n in names if not n.startswith("fault_")]
            raise ConfigError(f"unknown config key {section}.{key}; valid keys of {section!r}: {', '.join(public)}")
        if key.startswith("fault_") and os.environ.get(FAULTS_ENV) != "1":
            raise ConfigError(f"config key {section}.{key} is test-only fault injection (it kills or corrupts the "
                              f"run); refused unless the environment sets {FAULTS_ENV}=1")
        kwargs[key] = _check_number(_coerce(value, hints[key], f"{section}.{key}"), f"{section}.{key}")
    return cls(**kwargs)


def _check_number(value: Any, where: str) -> Any:
    """Numbers every key can hold: finite floats (nan passes every range check and would reach the
    step) and 64-bit integers (what torch and the seeds take)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config key {where}: expected a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and not -INT_LIMIT <= value < INT_LIMIT:
        raise ConfigError(f"config key {where}: {_short(value)} is out of range (|value| < 2**63)")
    return value


def _check_numbers_within(value: Any, where: str) -> None:
    """:func:`_check_number` on every number inside a mapping/list (``optimizer.args`` is free-form: a
    400-digit ``eps`` reached the optimizer as an OverflowError traceback)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_numbers_within(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_numbers_within(item, f"{where}[{i}]")
    else:
        _check_number(value, where)


def config_from_dict(raw: Any) -> Config:
    """Build and validate a :class:`Config` from a parsed YAML mapping."""
    raw = _mapping(raw, "config must be a mapping of sections")
    hints = typing.get_type_hints(Config)
    sections = [f.name for f in dataclasses.fields(Config)]
    kwargs = {}
    for key, value in raw.items():
        if key not in sections:
            raise ConfigError(f"unknown config section {key!r}; valid sections: {', '.join(sections)}")
        kwargs[key] = _build_section(hints[key], value, key)
    cfg = Config(**kwargs)
    _check_numbers_within(cfg.optimizer.args, "optimizer.args")
    validate(cfg)
    return cfg


def _positive(value: int | float, where: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key {where} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Value checks beyond types (ranges, choices, cross-field rules)."""
    m, d, t, o, s, c = cfg.model, cfg.data, cfg.train, cfg.optimizer, cfg.sharding, cfg.checkpoint
    for key in ("n_layer", "n_head", "d_model", "seq_len"):
        _positive(getattr(m, key), f"model.{key}")
    if m.d_model % m.n_head:
        raise ConfigError(f"config key model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    _positive(d.max_bytes, "data.max_bytes")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"config key data.val_fraction must be in (0, 1), got {d.val_fraction}")
    if d.path is not None and not os.path.exists(d.path):
        raise ConfigError(f"config key data.path: {d.path!r} does not exist")
    for key in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
        _positive(getattr(t, key), f"train.{key}")
    for key in ("warmup_steps", "eval_every", "max_nonfinite_steps"):
        _positive(getattr(t, key), f"train.{key}", allow_zero=True)
    for key in ("lr", "min_lr", "clip"):
        _positive(getattr(t, key), f"train.{key}", allow_zero=True)
    if t.schedule not in ("cosine", "constant", "linear"):
        raise ConfigError(f"config key train.schedule must be one of cosine, linear, constant; got {_short(t.schedule)}")
    if t.schedule != "constant" and t.min_lr > t.lr:  # the decay would climb to min_lr instead
        raise ConfigError(f"config key train.min_lr ({t.min_lr:g}) must be <= train.lr ({t.lr:g}) with train.schedule "
                          f"{t.schedule}; the schedule decays from train.lr to train.min_lr")
    if t.precision not in ("fp32", "bf16"):
        raise ConfigError(f"config key train.precision must be fp32 or bf16, got {_short(t.precision)}")
    if s.mode not in SHARDING_MODES:
        raise ConfigError(f"config key sharding.mode: unknown mode {_short(s.mode)}; valid modes: {', '.join(SHARDING_MODES)}")
    if m.dtype not in MODEL_DTYPES:
        raise ConfigError(f"config key model.dtype must be one of {', '.join(MODEL_DTYPES)}; got {_short(m.dtype)}")
    if t.gradient_release:
        check_gradient_release(cfg)
    if t.weight_grad_chunk is not None:
        check_weight_grad_chunk(cfg)
    check_directory_path(cfg.output.dir, "output.dir")
    if c.dir is not None:
        check_directory_path(c.dir, "checkpoint.dir")
    if c.every < 0 or c.keep < 1:
        raise ConfigError(f"config keys checkpoint.every (>= 0) / checkpoint.keep (>= 1) out of range: {c.every}, {c.keep}")
    check_optimizer(o.name, o.args, m.dtype)
    if m.dtype == "fp16" and o.name.lower() in ("torch.adamw", "torch.adam"):
        import torch

        eps = o.args.get("eps", 1e-8)
        if float(torch.tensor(eps, dtype=torch.float16)) == 0.0:
            raise ConfigError(f"config key model.dtype=fp16 with optimizer.name={o.name}: torch's Adam keeps fp16 "
                              f"moments for fp16 parameters and its eps={eps:g} is 0 in fp16, so the step divides "
                              "by zero (loss NaN within a few steps); use model.dtype: bf16, or a dist8 optimizer "
                              "(fp32 arithmetic on 8-bit state)")


def check_directory_path(path: str, key: str) -> None:
    """Refuse, naming ``key``, a directory path that cannot be one: an existing non-directory, or a path
    under a regular file (mkdir failed with a traceback at the first write, after the model was built).
    ``{optimizer}`` in it stays a literal here; it does not change which parts exist."""
    if not isinstance(path, str) or not path.strip():  # "" wrote the run's files into the working directory
        raise ConfigError(f"config key {key} must be a directory path, got {_short(path)}"
                          + (" (leave checkpoint.dir out, or null, for no checkpoints)" if key == "checkpoint.dir"
                             else ""))
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"config key {key}: {path!r} exists and is not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"config key {key}: {path!r} cannot be created: {str(parent)!r} is not a directory")
            return


def check_gradient_release(cfg: Config) -> None:
    """Refuse, naming the key, what ``train.gradient_release`` cannot do (see :mod:`dist8.optim.release`).

    DDP at world size > 1 is refused when the engine is built (the world size is not known here).
    """
    t, s, o, m = cfg.train, cfg.sharding, cfg.optimizer, cfg.model
    why = "each parameter is stepped inside backward and its gradient freed"
    if t.grad_accum > 1:
        raise ConfigError(f"config key train.grad_accum={t.grad_accum} is incompatible with train.gradient_release "
                          f"({why}: no gradient is left to accumulate); set train.grad_accum: 1")
    if t.clip > 0:
        raise ConfigError(f"config key train.clip={t.clip} (a global gradient-norm clip) is incompatible with "
                          f"train.gradient_release ({why} before any global norm exists); set train.clip: 0 "
                          "(optimizer.args.percentile_clipping clips per parameter)")
    if m.dtype == "fp16":
        raise ConfigError("config key model.dtype=fp16 needs loss scaling (GradScaler), which is incompatible with "
                          "train.gradient_release (parameters step with unchecked scaled gradients); use model.dtype: bf16")
    if s.mode == "deepspeed":
        raise ConfigError("config key sharding.mode=deepspeed is incompatible with train.gradient_release (DeepSpeed "
                          "owns backward and the step); use sharding.mode fsdp2")
    if s.mode in ("dist8-zero1", "dist8-zero2"):
        raise ConfigError(f"config key sharding.mode={s.mode} is incompatible with train.gradient_release "
                          "(ShardedOptimizer keeps a flat gradient buffer, so nothing would be freed); use sharding.mode "
                          "fsdp2 (or ddp on one process)")
    if is_torch_optimizer(o.name):
        raise ConfigError(f"config key optimizer.name={o.name} is incompatible with train.gradient_release "
                          "(it needs a dist8 optimizer)")
    if o.args.get("on_nonfinite") == "raise":
        raise ConfigError("config key optimizer.args.on_nonfinite=raise is incompatible with train.gradient_release "
                          f"({why}, one at a time: a raise could not undo the others); use skip or skip_param")


def check_weight_grad_chunk(cfg: Config) -> None:
    """Refuse, naming the key, a ``train.weight_grad_chunk`` that cannot apply (see :mod:`dist8.optim.chunked_grads`)."""
    t, s, o = cfg.train, cfg.sharding, cfg.optimizer
    chunk = t.weight_grad_chunk
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ConfigError(f"config key train.weight_grad_chunk must be a number of elements > 0 or null, got {chunk!r}")
    if not t.gradient_release:
        raise ConfigError("config key train.weight_grad_chunk needs train.gradient_release: true (the chunks are "
                          "stepped inside backward)")
    if s.mode == "fsdp2":
        raise ConfigError("config key train.weight_grad_chunk is incompatible with sharding.mode fsdp2 (FSDP2 "
                          "reduce-scatters whole gradients); set it to null")
    if o.name.split(".")[-1].lower().startswith(("lamb", "lars")):
        raise ConfigError(f"config key train.weight_grad_chunk is incompatible with optimizer.name={o.name} (its "
                          "trust ratio needs the whole update); set it to null")
    if o.args.get("on_nonfinite", "skip") != "skip":
        raise ConfigError(f"config key train.weight_grad_chunk is incompatible with optimizer.args.on_nonfinite="
                          f"{o.args['on_nonfinite']} (it checks the whole gradient first); use skip or set it to null")


def optimizer_class(name: str) -> type:
    """The optimizer class for ``optimizer.name`` (a dist8 name or ``torch.adamw``/``torch.adam``/``torch.sgd``)."""
    import torch

    torch_classes = {"torch.adamw": torch.optim.AdamW, "torch.adam": torch.optim.Adam, "torch.sgd": torch.optim.SGD}
    if name.lower() in torch_classes:
        return torch_classes[name.lower()]
    from dist8.optim import OPTIMIZERS, get_optimizer_class

    try:
        return get_optimizer_class(name)
    except ValueError:
        valid = ", ".join([*OPTIMIZERS, *TORCH_OPTIMIZERS])
        raise ConfigError(f"config key optimizer.name: unknown optimizer {name!r}; valid names: {valid}") from None


def torch_dtype(name: str) -> Any:
    """The torch dtype of ``model.dtype`` (``fp32`` / ``bf16`` / ``fp16``)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


# The config check's stand-in parameter; its name is replaced by the pattern in the optimizer's messages.
_DUMMY = "__dist8_config_check__"


def check_optimizer(name: str, args: dict[str, Any], model_dtype: str = "fp32") -> None:
    """Fail early on a bad optimizer name or arguments by building it on a dummy parameter.

    The dummy has the model's parameter dtype, so arguments that depend on it
    (``master_weight_bits`` needs bf16/fp16 parameters) are checked by the optimizer itself.
    Each ``overrides`` pattern's settings are checked on the dummy too; whether the pattern names
    a parameter is checked against the model's names once it exists (:func:`check_override_patterns`).
    """
    import torch

    cls = optimizer_class(name)
    overrides = _override_items(args.get("overrides"))
    _refuse_job_owned(args, "optimizer.args")
    for pattern, settings in overrides:
        _refuse_job_owned(settings, f"optimizer.args.overrides[{pattern!r}]")
    dummy = torch.zeros(4, dtype=torch_dtype(model_dtype), requires_grad=True)
    if is_torch_optimizer(name):  # arguments that do not apply are dropped (fit_to_optimizer)
        _build_on(cls, [dummy], applicable_optimizer_args(cls, args)[0], "optimizer.args")
        return
    plain = {k: v for k, v in args.items() if k != "overrides"}
    _build_on(cls, [(_DUMMY, dummy)], plain, "optimizer.args")
    for pattern, settings in overrides:
        _build_on(cls, [(_DUMMY, dummy)], dict(plain, overrides={_DUMMY: settings}),
                  f"optimizer.args.overrides[{pattern!r}]", pattern)


def _build_on(cls: type, params: list, args: dict[str, Any], where: str, pattern: str | None = None) -> None:
    """Build ``cls`` on the dummy; its refusal becomes a ConfigError naming ``where``."""
    try:
        cls(params, lr=1e-3, **args)
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        msg = " ".join(str(exc).split())
        if pattern is not None:
            msg = msg.replace(repr(_DUMMY), repr(pattern))
        raise ConfigError(f"config key {where} is not valid for {cls.__name__}: {msg}") from None


def _override_items(overrides: Any) -> list[tuple[str, dict[str, Any]]]:
    """``optimizer.args.overrides`` as (pattern, settings) pairs, its shape checked."""
    if overrides is None:
        return []
    if not isinstance(overrides, dict):
        raise ConfigError("config key optimizer.args.overrides must be a mapping of parameter-name pattern -> "
                          f"settings, got {type(overrides).__name__} {_short(overrides)}")
    for pattern, settings in overrides.items():
        if not isinstance(pattern, str) or not isinstance(settings, dict):
            raise ConfigError(f"config key optimizer.args.overrides[{pattern!r}] must map a parameter-name pattern "
                              f"(a string) to a mapping of settings, got {type(settings).__name__} {_short(settings)}")
    return list(overrides.items())


def _refuse_job_owned(args: dict[str, Any], where: str) -> None:
    for key, why in JOB_OWNED_ARGS.items():
        if key in args:
            raise ConfigError(f"config key {where}.{key}: {why}; a value here would replace the job's while the "
                              "metrics log the job's")


def check_override_patterns(args: dict[str, Any], names: list[str]) -> None:
    """Refuse an ``optimizer.args.overrides`` pattern that matches none of the model's parameter ``names``
    (a typo would leave the parameter at the defaults). Called once the model exists, before the optimizer
    is built; every rank builds the same model, so every rank refuses alike."""
    from dist8.optim.config import check_overrides_match

    overrides = dict(_override_items(args.get("overrides")))
    try:
        check_overrides_match(overrides, names)
    except ValueError as exc:
        raise ConfigError(f"config key optimizer.args.overrides: {' '.join(str(exc).split())}") from None


def is_torch_optimizer(name: str) -> bool:
    """True for the fp32 baselines ``torch.adamw`` / ``torch.adam`` / ``torch.sgd``."""
    return name.lower() in TORCH_OPTIMIZERS


def applicable_optimizer_args(cls: type, args: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Split ``optimizer.args`` into those ``cls`` accepts and the names of those it does not."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    kept = {k: v for k, v in args.items() if k in accepted}
    return kept, [k for k in args if k not in accepted]


def fit_to_optimizer(cfg: Config) -> list[str]:
    """Make a config written for a dist8 optimizer run with a torch baseline; returns one note per change.

    ``--set optimizer.name=torch.adamw`` on a dist8 config is the fp32 baseline: arguments the
    torch class does not take (``block_size``, ``min_8bit_size``, ...) are dropped, and the
    dist8-only sharding modes (``dist8-zero1``/``dist8-zero2``) fall back to ``ddp``. Also
    expands ``{optimizer}`` in ``output.dir`` and ``checkpoint.dir``.
    """
    notes = []
    o, s = cfg.optimizer, cfg.sharding
    if is_torch_optimizer(o.name):
        cls = optimizer_class(o.name)
        o.args, dropped = applicable_optimizer_args(cls, o.args)
        if dropped:
            what = f"optimizer.args.{dropped[0]} does" if len(dropped) == 1 else \
                f"optimizer.args {', '.join(dropped)} do"
            notes.append(f"{what} not apply to {o.name} (torch.optim.{cls.__name__}); dropped")
        if s.mode in ("dist8-zero1", "dist8-zero2"):
            notes.append(f"sharding.mode {s.mode} shards dist8 optimizers only; {o.name} runs under ddp")
            s.mode = "ddp"
    slug = o.name.lower()
    cfg.output.dir = cfg.output.dir.replace("{optimizer}", slug)
    if cfg.checkpoint.dir:
        cfg.checkpoint.dir = cfg.checkpoint.dir.replace("{optimizer}", slug)
    return notes


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values read as plain YAML; text that is not is taken as a string)."""
    raw = dict(raw or {})
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value (e.g. train.steps=100), got {item!r}")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".")]
        if len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set key must be section.key (e.g. train.steps), got {key!r}")
        try:
            value = load_yaml(text, f"--set {key}")
        except DuplicateKeyError as exc:  # plain YAML, but it says one thing twice
            raise ConfigError(str(exc)) from None
        except YamlError:
            value = text  # not plain YAML (e.g. a glob such as *.txt): the text itself; the key's type check applies
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None, sets: list[str] | None = None) -> Config:
    """Read a YAML config (or defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    raw: Any = {}
    if path is not None:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO without a writer hung the job
                raise ConfigError(f"config {str(path)!r} is not a regular file")
            with open(path, encoding="utf-8") as f:
                text = f.read(MAX_BYTES + 1)  # one past the limit: an oversized file is refused, not cut
            raw = load_yaml(text, f"config {str(path)!r}")
        except OSError as exc:
            raise ConfigError(f"cannot read config {str(path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config {str(path)!r} is not UTF-8 text: {exc.reason}") from None
        except YamlError as exc:
            raise ConfigError(str(exc)) from None
        if raw is None:  # empty or only comments: most likely a file that lost its contents, not "all defaults"
            raise ConfigError(f"config {str(path)!r} is empty (no sections, only comments or blank); write the "
                              "sections to change, or run without --config for the built-in defaults")
        if not isinstance(raw, dict):
            raise ConfigError(f"config {str(path)!r} must be a mapping of sections, got {type(raw).__name__}")
    raw = _deep_copy(raw or {})
    raw = apply_overrides(raw, list(sets or []))
    return config_from_dict(raw)


def _deep_copy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)
