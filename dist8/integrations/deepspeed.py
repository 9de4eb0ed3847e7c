"""DeepSpeed with dist8's 8-bit optimizers: ``"optimizer": {"type": "dist8.AdamW8bit", ...}`` in a DeepSpeed config.

Usage::

    import dist8.integrations.deepspeed as d8ds
    engine, optimizer, _, _ = d8ds.initialize(model=model, config="configs/deepspeed-zero2.json")
    # or: d8ds.install(); deepspeed.initialize(...)   (plain DeepSpeed, e.g. under HF Trainer)

What :func:`install` does (idempotent): it wraps ``DeepSpeedEngine._configure_basic_optimizer``
so that an optimizer ``type`` starting with ``dist8.`` (any name of :data:`dist8.optim.OPTIMIZERS`,
case-insensitive) builds that dist8 optimizer from the config's ``params`` (``"auto"`` values,
as HF Trainer leaves them, mean "dist8's default"; unknown keys fail naming the key and the
valid ones), and marks it as tested for ZeRO so ``zero_allow_untested_optimizer`` is not needed.
It also wraps ``DeepSpeedEngine._configure_optimizer`` to tell the optimizer, after DeepSpeed
has flattened and partitioned the parameters, which original parameter every range of each
flat partition belongs to.

``import dist8`` does **not** install the hook (it must not import DeepSpeed); call
:func:`install` or :func:`initialize`, or set ``DIST8_DEEPSPEED=1`` and ``import
dist8.integrations.deepspeed`` (the module installs itself on import when DeepSpeed is
importable and the variable is set). ``python -m dist8.train`` with ``sharding.mode:
deepspeed`` goes through :func:`wrap_for_training`, which installs it.

Flat partitions (ZeRO 1/2/3, bf16 optimizer). DeepSpeed hands the optimizer one flat fp32
tensor per param group and rank. The dist8 optimizer built here keeps one *segment* of state
per (original parameter, flat partition) range, so:

* quantization blocks never cross parameters (blocks start at the segment start);
* ``min_8bit_size`` is compared with the element count of the whole original parameter
  (``ds_numel`` under ZeRO-3), never with the partition or the segment;
* ``overrides`` patterns match the original parameter names (``model.named_parameters()``)
  and module marks (e.g. :class:`dist8.nn.StableEmbedding`) are kept;
* alignment padding in the flat partition has no state and is never updated.

Where no mapping is known (an unknown DeepSpeed wrapper), the flat tensor is marked with
``_dist8_global_numel`` = the group's total parameter count, so the decision is made on the
model, not the shard.

CPU offload (``zero_optimization.offload_optimizer.device: cpu``): DeepSpeed would otherwise
build its 32-bit ``DeepSpeedCPUAdam``; with a ``dist8.*`` type the dist8 optimizer steps the
host-resident fp32 partitions with dist8's fused CPU kernel (8-bit state in host memory).

Checkpoints: ``engine.save_checkpoint`` / ``engine.load_checkpoint`` work at the same world
size (the dist8 state travels inside DeepSpeed's optimizer files). To resume at another
data-parallel size, convert with ``dist8 ckpt from-deepspeed DIR OUT`` (or
:func:`dist8.integrations.deepspeed_convert.from_deepspeed`) into dist8's world-size-independent
format, then call :func:`load_dist8_checkpoint` on the new engine (any ZeRO stage, any world
size) -- or load it into a plain dist8 optimizer with :func:`dist8.checkpoint.load`.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from dist8.optim import OPTIMIZERS, get_optimizer_class
from dist8.optim.base import Optimizer8bit, ParamSettings
from dist8.optim.config import GLOBAL_NUMEL_ATTR, OVERRIDE_ATTR, match_overrides, uses_8bit

__all__ = [
    "install",
    "uninstall",
    "is_installed",
    "initialize",
    "wrap_for_training",
    "optimizer_from_config",
    "optimizer_kwargs",
    "load_dist8_checkpoint",
    "Segment",
    "INSTALL_HINT",
]

PREFIX = "dist8."
INSTALL_HINT = "DeepSpeed is not installed: pip install dist8[deepspeed]  (or: pip install deepspeed)"
_NOT_KWARGS = {"self", "params", "defaults", "args", "a", "kw", "kwargs", "is_paged"}

_state: dict[str, Any] = {"installed": False, "originals": {}}


def _require_deepspeed():
    try:
        import deepspeed  # noqa: F401
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError as exc:
        raise ImportError(f"dist8.integrations.deepspeed: {INSTALL_HINT} ({exc})") from exc
    return deepspeed, DeepSpeedEngine


def is_dist8_type(name: Any) -> bool:
    return isinstance(name, str) and name.lower().startswith(PREFIX)


# ---- config ----------------------------------------------------------------------------
def valid_keys(cls: type[Optimizer8bit]) -> list[str]:
    """Keyword arguments ``cls`` accepts (its own and :class:`Optimizer8bit`'s)."""
    keys: list[str] = []
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or "__init__" not in vars(klass):
            continue
        for name, prm in inspect.signature(vars(klass)["__init__"]).parameters.items():
            if name in _NOT_KWARGS or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD) or name in keys:
                continue
            keys.append(name)
        if klass is Optimizer8bit:
            break
    return keys


def optimizer_kwargs(cls: type[Optimizer8bit], params: dict[str, Any] | None) -> dict[str, Any]:
    """Turn a DeepSpeed ``optimizer.params`` dict into keyword arguments for ``cls``.

    ``"auto"`` (left by HF Trainer) and ``None`` mean "use dist8's default"; ``betas`` lists
    become tuples; an unknown key raises ``ValueError`` naming it and listing the valid ones.
    """
    valid = valid_keys(cls)
    out: dict[str, Any] = {}
    for key, value in (params or {}).items():
        if key not in valid:
            hint = ""
            if key == "max_grad_norm":
                hint = " (use DeepSpeed's top-level 'gradient_clipping')"
            raise ValueError(f"DeepSpeed config optimizer.params has unknown key {key!r} for dist8.{cls.__name__}"
                             f"{hint}; valid keys: {', '.join(valid)}")
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            continue
        if key == "betas":
            value = tuple(float(b) for b in value)
        elif key in ("lr", "eps", "weight_decay") and isinstance(value, (int, float, str)):
            value = float(value)
        out[key] = value
    return out


def optimizer_from_config(name: str, params: dict[str, Any] | None, model_parameters, named=None):
    """Build the DeepSpeed-aware dist8 optimizer ``name`` (``"dist8.AdamW8bit"``) for ``model_parameters``.

    ``named`` maps parameter -> name (``model.named_parameters()``); names drive ``overrides``.
    """
    cls = get_optimizer_class(name)
    kwargs = optimizer_kwargs(cls, params)
    named = named or {}
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        groups = []
        for g in items:
            g = dict(g)
            g["params"] = [(named[p], p) if p in named else p for p in g["params"]]
            groups.append(g)
        args = groups
    else:
        args = [(named[p], p) if p in named else p for p in items]
    return segmented_class(cls)(args, **kwargs)


# ---- segments: per-parameter state inside DeepSpeed's flat partitions -------------------------------------
@dataclass(frozen=True)
class Segment:
    """Elements ``[offset, offset + numel)`` of a flat partition are elements ``[param_start, ...)`` of parameter ``name``."""

    name: str
    offset: int
    numel: int
    param_start: int
    shape: tuple[int, ...]
    global_numel: int
    marks: dict = field(default_factory=dict, compare=False, hash=False)


class _Marked:
    def __init__(self, marks: dict) -> None:
        setattr(self, OVERRIDE_ATTR, marks)


class DeepSpeedSegments:
    """Mix-in for a dist8 optimizer class: per-original-parameter state inside flat partitions.

    ``self.ds_segments`` maps a flat tensor (as DeepSpeed put it in ``param_groups``) to its
    :class:`Segment` list. Its state is ``{"step": n, "segments": [state per segment],
    "segment_names": [...], "segment_starts": [...], "segment_shapes": [...]}``.
    """

    ds_segments: dict

    def segment_settings(self, seg: Segment, group: dict[str, Any]) -> ParamSettings:
        extra = match_overrides(seg.name, _Marked(seg.marks), self.overrides)
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper.update(extra)
        if extra:
            self._check_group(dict(hyper, params=[]), -1)
        use_8bit = uses_8bit(hyper["optim_bits"], hyper["min_8bit_size"], seg.global_numel)
        block = self.block_size if self.block_wise else max(64, 1 << max(seg.global_numel - 1, 1).bit_length())
        return ParamSettings(name=seg.name, use_8bit=use_8bit, block_size=block, hyper=hyper)

    @staticmethod
    def _view(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
        return flat.detach().view(-1).narrow(0, seg.offset, seg.numel)

    @torch.no_grad()
    def step(self, closure=None):
        segs_of = getattr(self, "ds_segments", None) or {}
        if not segs_of:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        owners = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                segs = segs_of.get(p)
                if segs is None:
                    settings = self.settings(p, group)
                    if not self.state[p]:
                        self.state[p] = self.init_state(p, settings)
                    items.append((p, settings, self.state[p]))
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, segments=[None] * len(segs), segment_names=[s.name for s in segs],
                              segment_starts=[s.param_start for s in segs],
                              segment_shapes=[list(s.shape) for s in segs])
                grad = p.grad.detach().view(-1)
                for i, seg in enumerate(segs):
                    view = self._view(p, seg)
                    view.grad = grad.narrow(0, seg.offset, seg.numel)
                    settings = self.segment_settings(seg, group)
                    if st["segments"][i] is None:
                        st["segments"][i] = self.init_state(view, settings)
                    items.append((view, settings, st["segments"][i]))
                owners.append(st)
        if items:
            self._run_updates(items)
        for st in owners:
            st["step"] = max([s["step"] for s in st["segments"] if s is not None], default=st["step"])
        return loss

    def state_nbytes(self) -> int:
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
            for seg in st.get("segments", None) or []:
                if seg:
                    total += sum(v.numel() * v.element_size() for v in seg.values() if isinstance(v, torch.Tensor))
        return total

    def state_dtypes(self) -> dict[str, torch.dtype]:
        """``{parameter name (or flat position): dtype of state1}`` over all state (for tests and reports)."""
        out = {}
        for p, st in self.state.items():
            if "segments" in st:
                for name, seg in zip(st["segment_names"], st["segments"]):
                    if seg:
                        out[name] = seg["state1"].dtype
            elif "state1" in st:
                out[self.param_name(p)] = st["state1"].dtype
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        names = {}
        pid = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self._names:
                    names[pid] = self._names[p]
                pid += 1
        sd["dist8"] = {"class": type(self).__name__, "block_size": self.block_size, "names": names}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        segs_of = getattr(self, "ds_segments", None) or {}
        if not segs_of:
            return super().load_state_dict({k: v for k, v in state_dict.items() if k != "dist8"})
        plain = {"state": {}, "param_groups": state_dict["param_groups"]}
        seg_states = {}
        for key, st in state_dict["state"].items():
            (seg_states if "segments" in st else plain["state"])[key] = st
        super().load_state_dict(plain)
        id_map = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_map.update(zip(saved["params"], group["params"]))
        for key, st in seg_states.items():
            p = id_map[key]
            segs = segs_of.get(p)
            if segs is None or [s.name for s in segs] != list(st["segment_names"]):
                raise ValueError(f"DeepSpeed optimizer state for flat partition {key} holds parameters "
                                 f"{list(st['segment_names'])[:4]}..., which do not match this engine's partition "
                                 "(different world size or model? use `dist8 ckpt from-deepspeed` to reshard)")
            new = dict(st)
            new["segments"] = [None if s is None else self._checked_state(self._view(p, seg), s)
                               for seg, s in zip(segs, st["segments"])]
            self.state[p] = new


_CLASSES: dict[type, type] = {}


def segmented_class(cls: type[Optimizer8bit]) -> type[Optimizer8bit]:
    """``cls`` with the :class:`DeepSpeedSegments` mix-in (same ``__name__``, so checkpoints name ``cls``)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (DeepSpeedSegments, cls), {"__module__": __name__,
                                                                      "__doc__": cls.__doc__})
    return _CLASSES[cls]


def _rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group=group) if dist.is_available() and dist.is_initialized() else 0


def attach_segments(engine) -> dict:
    """Tell ``engine.basic_optimizer`` (a dist8 optimizer) what each flat partition holds."""
    opt = engine.basic_optimizer
    wrapper = engine.optimizer
    module = engine.module
    names = {p: n for n, p in module.named_parameters()}
    segs: dict[torch.Tensor, list[Segment]] = {}
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    if any(p in names for p in opt_params) and not hasattr(wrapper, "fp32_partitioned_groups_flat"):
        opt.ds_segments = {}
        return {}  # the optimizer holds the model's own parameters (no ZeRO, fp32)
    if hasattr(wrapper, "fp32_partitioned_groups_flat") and hasattr(wrapper, "fp16_groups"):  # ZeRO-3
        rank = _rank(getattr(wrapper, "dp_process_group", None))
        for i, params in enumerate(wrapper.fp16_groups):
            flat = wrapper.fp32_partitioned_groups_flat[i]
            off = 0
            lst = []
            for p in params:
                pn = p.ds_tensor.ds_numel
                start = rank * pn
                real = max(0, min(pn, p.ds_numel - start))
                if real:
                    lst.append(Segment(names.get(p, f"param{id(p)}"), off, real, start, tuple(p.ds_shape), p.ds_numel,
                                       dict(getattr(p, OVERRIDE_ATTR, {}) or {})))
                off += pn
            segs[flat] = lst
    else:
        for n, p in module.named_parameters():
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            flat = opt.param_groups[m.param_group_index]["params"][0]
            segs.setdefault(flat, []).append(Segment(n, m.hp_fragment_address.start, m.hp_fragment_address.numel,
                                                     m.lp_fragment_address.start, tuple(p.shape), p.numel(),
                                                     dict(getattr(p, OVERRIDE_ATTR, {}) or {})))
        for lst in segs.values():
            lst.sort(key=lambda s: s.offset)
        # fp16 unfused optimizer: per-parameter fp32 copies; name them.
        if not segs and hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    if lp in names:
                        opt._names[hp] = names[lp]
                        if getattr(lp, OVERRIDE_ATTR, None):
                            setattr(hp, OVERRIDE_ATTR, getattr(lp, OVERRIDE_ATTR))
    for g in opt.param_groups:  # anything left unmapped: decide on the model's size, not the shard's
        for p in g["params"]:
            if p not in segs and p not in names and p not in opt._names:
                total = sum(q.numel() if not hasattr(q, "ds_numel") else q.ds_numel for q in names)
                setattr(p, GLOBAL_NUMEL_ATTR, total)
    opt.ds_segments = segs
    return segs


# ---- install ---------------------------------------------------------------------------------
def install() -> None:
    """Teach DeepSpeed the ``dist8.*`` optimizer types (idempotent)."""
    if _state["installed"]:
        return
    _deepspeed, Engine = _require_deepspeed()
    orig_basic = Engine._configure_basic_optimizer
    orig_configure = Engine._configure_optimizer
    orig_supported = Engine._is_supported_optimizer

    def _is_supported_optimizer(self, optimizer_name):
        if is_dist8_type(optimizer_name):
            get_optimizer_class(optimizer_name)  # unknown dist8 name: ValueError listing the valid ones
            return True
        return orig_supported(self, optimizer_name)

    def _configure_basic_optimizer(self, model_parameters):
        name = self.optimizer_name()
        if not is_dist8_type(name):
            return orig_basic(self, model_parameters)
        named = {p: n for n, p in self.module.named_parameters()}
        opt = optimizer_from_config(name, self.optimizer_params(), model_parameters, named)
        self._config.zero_allow_untested_optimizer = True  # dist8 optimizers are tested under ZeRO 1/2/3
        return opt

    def _configure_optimizer(self, client_optimizer, model_parameters):
        if client_optimizer is None and is_dist8_type(self.optimizer_name()):
            # Resolve the class now so a bad name fails before DeepSpeed starts partitioning.
            get_optimizer_class(self.optimizer_name())
        orig_configure(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), DeepSpeedSegments):
            attach_segments(self)

    _configure_basic_optimizer.__wrapped__ = orig_basic
    _configure_optimizer.__wrapped__ = orig_configure
    _state["originals"] = {"_configure_basic_optimizer": orig_basic, "_configure_optimizer": orig_configure,
                           "_is_supported_optimizer": orig_supported}
    Engine._is_supported_optimizer = _is_supported_optimizer
    Engine._configure_basic_optimizer = _configure_basic_optimizer
    Engine._configure_optimizer = _configure_optimizer
    _state["installed"] = True


def uninstall() -> None:
    """Undo :func:`install`."""
    if not _state["installed"]:
        return
    _d, Engine = _require_deepspeed()
    for k, v in _state["originals"].items():
        setattr(Engine, k, v)
    _state["installed"] = False


def is_installed() -> bool:
    return bool(_state["installed"])


def _load_config(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            return json.load(f)
    return dict(config)


def _check_config(config: dict) -> None:
    opt = config.get("optimizer") or {}
    if is_dist8_type(opt.get("type")):
        cls = get_optimizer_class(opt["type"])
        optimizer_kwargs(cls, opt.get("params"))  # raise early on unknown keys


def resolve_auto(config: dict) -> dict:
    """Copy of ``config`` with HF-Trainer-style ``"auto"`` values removed (top level) or off (``enabled``)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, str) and value.lower() == "auto":
            continue
        if isinstance(value, dict):
            value = {k: (False if k == "enabled" and isinstance(v, str) and v.lower() == "auto" else v)
                     for k, v in value.items()}
        out[key] = value
    return out


def initialize(*args, config=None, config_params=None, **kwargs):
    """:func:`install`, check the config, then ``deepspeed.initialize(...)`` (same arguments).

    Accepts a ``dist8.*`` optimizer section, or a dist8 optimizer instance as ``optimizer=``
    (it then gets the same per-parameter treatment of flat partitions, and neither
    ``zero_allow_untested_optimizer`` nor ``zero_force_ds_cpu_optimizer: false`` is needed).
    ``"auto"`` values left in the config mean DeepSpeed's defaults.
    """
    deepspeed, _ = _require_deepspeed()
    install()
    cfg = config if config is not None else config_params
    if cfg is not None:
        cfg = resolve_auto(_load_config(cfg))
        _check_config(cfg)
    client = kwargs.get("optimizer")
    if isinstance(client, Optimizer8bit):
        if not isinstance(client, DeepSpeedSegments):
            client.__class__ = segmented_class(type(client))
        cfg = dict(cfg or {})
        cfg.setdefault("zero_allow_untested_optimizer", True)
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)  # offload steps the dist8 optimizer on the host
    if cfg is not None:
        kwargs["config"] = cfg
    return deepspeed.initialize(*args, **kwargs)


def wrap_for_training(model: torch.nn.Module, optimizer_name: str, optimizer_args: dict[str, Any] | None,
                      ds_config_path, *, dist_backend: str | None = None, model_parameters=None,
                      overrides: dict[str, Any] | None = None):
    """Adapter for ``dist8.train`` (``sharding.mode: deepspeed``): returns ``(engine, optimizer)``.

    ``optimizer_name`` (``"AdamW8bit"`` or ``"dist8.AdamW8bit"``) and ``optimizer_args`` replace
    the config file's ``optimizer`` section; ``overrides`` are merged into the top level of the
    config (e.g. ``{"train_micro_batch_size_per_gpu": 8}``). Initialises torch.distributed if
    needed (``dist_backend``: default gloo on CPU, nccl on CUDA). ``engine.module`` is the
    model; call ``engine.backward(loss)`` and ``engine.step()``.
    """
    deepspeed, _ = _require_deepspeed()
    config = resolve_auto(_load_config(ds_config_path))
    name = optimizer_name if is_dist8_type(optimizer_name) else PREFIX + optimizer_name
    get_optimizer_class(name)
    config["optimizer"] = {"type": name, "params": dict(optimizer_args or {})}
    config.update(overrides or {})
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        deepspeed.init_distributed(dist_backend=backend)
    engine, optimizer, _, _ = initialize(model=model, model_parameters=model_parameters
                                         if model_parameters is not None else [p for p in model.parameters()
                                                                               if p.requires_grad], config=config)
    return engine, optimizer


# ---- resume: dist8/integrations/deepspeed_resume.py -----------------------------------------------------
from dist8.integrations.deepspeed_resume import load_dist8_checkpoint  # noqa: E402  (re-export)

__all__ += ["resolve_auto", "DeepSpeedSegments", "segmented_class", "attach_segments", "OPTIMIZERS", "valid_keys", "is_dist8_type"]


if os.environ.get("DIST8_DEEPSPEED", "") not in ("", "0"):
    try:
        install()
    except ImportError:
        pass
