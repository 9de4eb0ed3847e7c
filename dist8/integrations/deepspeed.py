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
DeepSpeed's ZeRO check (``is_zero_supported_optimizer``, as the engine module names it) counts
every dist8 optimizer as supported: they are tested under ZeRO 0-3, so DeepSpeed's "using ZeRO
with an untested optimizer, proceed with caution" warning would be false.
It also wraps ``DeepSpeedEngine._configure_optimizer`` to tell the optimizer, after DeepSpeed
has flattened and partitioned the parameters, which original parameter every range of each
flat partition belongs to -- also for a dist8 optimizer passed as ``optimizer=`` (an instance or
a callable; HF Trainer, accelerate and Lightning pass their own that way), which becomes that
instance's segmented class in place (:func:`~dist8.integrations.deepspeed_segments.segment_in_place`).
Before 2026-12-05 such an instance kept its plain class under plain ``deepspeed.initialize``: one
8-bit state over each whole flat partition (``min_8bit_size`` and overrides lost), and with two
param groups (HF Trainer's decay / no-decay) its state freed and restarted at every step, as
DeepSpeed steps one group at a time. A config naming a ``dist8.*`` type together with an
``optimizer=`` is refused (DeepSpeed used the client and dropped the section, silently).

The one way: ``import dist8.integrations.deepspeed`` installs the hook (when DeepSpeed is
importable; ``DIST8_DEEPSPEED=0`` opts out), so a config with ``"type": "dist8.*"`` then works
with plain ``deepspeed.initialize``, the HF Trainer and accelerate, with no other code change.
:func:`install`/:func:`initialize` do the same explicitly. ``import dist8`` alone does **not**
install it (it must not import DeepSpeed); it only arms a clear error
(:mod:`dist8.integrations.deepspeed_hint`) for a ``dist8.*`` type met before the hook is
installed, instead of DeepSpeed's "is not a supported DeepSpeed Optimizer".
``dist8 train`` with ``sharding.mode: deepspeed`` goes through :func:`initialize`.

The config translation is in :mod:`dist8.integrations.deepspeed_config`, the per-parameter
segments of flat partitions in :mod:`dist8.integrations.deepspeed_segments`, resuming from a
dist8 checkpoint at another world size in :mod:`dist8.integrations.deepspeed_resume`.

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

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dist8.env import env_flag
from dist8.integrations.deepspeed_config import check_config, is_dist8_type, load_config, optimizer_kwargs, resolve_auto
from dist8.integrations.deepspeed_resume import load_dist8_checkpoint
from dist8.integrations.deepspeed_segments import attach_segments, segment_in_place, segmented_class
from dist8.optim import get_optimizer_class
from dist8.optim.base import Optimizer8bit

if TYPE_CHECKING:  # DeepSpeed is imported only by install() / initialize()
    import torch
    from deepspeed.runtime.engine import DeepSpeedEngine

__all__ = [
    "install",
    "uninstall",
    "is_installed",
    "initialize",
    "optimizer_from_config",
    "load_dist8_checkpoint",
    "INSTALL_HINT",
]

INSTALL_HINT = "DeepSpeed is not installed: pip install dist8[deepspeed]  (or: pip install deepspeed)"

_state: dict[str, Any] = {"installed": False, "originals": {}, "module_originals": {}}


def _require_deepspeed():
    try:
        import deepspeed  # noqa: F401
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError as exc:
        raise ImportError(f"dist8.integrations.deepspeed: {INSTALL_HINT} ({exc})") from exc
    return deepspeed, DeepSpeedEngine


def optimizer_from_config(name: str, params: dict[str, Any] | None,
                          model_parameters: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
                          named: dict[torch.Tensor, str] | None = None) -> Optimizer8bit:
    """Build the DeepSpeed-aware dist8 optimizer ``name`` (``"dist8.AdamW8bit"``) for ``model_parameters``.

    Args:
        name: the config's optimizer ``type``, a name :func:`dist8.get_optimizer_class` knows
            (``"dist8.AdamW8bit"``; case-insensitive). Unknown: ValueError listing the valid ones.
        params: the config's optimizer ``params``: the class's keyword arguments; ``"auto"`` or None
            values (and None for the whole dict) mean dist8's defaults, an unknown key raises ValueError.
        model_parameters: the parameters (tensors), or param-group dicts with a ``"params"`` list,
            as DeepSpeed passes them.
        named: parameter -> name (``{p: n for n, p in model.named_parameters()}``); names drive
            ``overrides``. Default None (no names).
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


# ---- install ---------------------------------------------------------------------------------
def install() -> None:
    """Teach DeepSpeed the ``dist8.*`` optimizer types (idempotent)."""
    if _state["installed"]:
        return
    _deepspeed, Engine = _require_deepspeed()
    import deepspeed.runtime.engine as engine_module

    orig_zero_supported = engine_module.is_zero_supported_optimizer
    orig_basic = Engine._configure_basic_optimizer
    orig_configure = Engine._configure_optimizer
    orig_supported = Engine._is_supported_optimizer
    orig_load = Engine.load_checkpoint

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
        if client_optimizer is not None and is_dist8_type(self._config.optimizer_name):
            # DeepSpeed would step the client and drop the config's optimizer section without a word
            raise ValueError(
                f"the DeepSpeed config names optimizer {self._config.optimizer_name!r} and an optimizer was passed "
                f"to initialize too ({type(client_optimizer).__name__}): give one, the config's \"optimizer\" "
                "section or optimizer=")
        if isinstance(client_optimizer, Optimizer8bit):
            # offload: the dist8 optimizer steps the host partitions with its C++ kernel (no DeepSpeedCPUAdam)
            self._config.zero_force_ds_cpu_optimizer = False
        orig_configure(self, client_optimizer, model_parameters)
        if isinstance(getattr(self, "basic_optimizer", None), Optimizer8bit):
            # a client instance or callable (HF Trainer, accelerate, Lightning): the same per-parameter
            # state in the flat partitions as a config's dist8 type, on the very object DeepSpeed steps
            segment_in_place(self.basic_optimizer)
            attach_segments(self)

    def load_checkpoint(self, load_dir, *args, **kwargs):
        try:
            return orig_load(self, load_dir, *args, **kwargs)
        except Exception as exc:
            # DeepSpeed refuses its ZeRO checkpoints at another world size: say how dist8's state gets there
            if isinstance(getattr(self, "basic_optimizer", None), Optimizer8bit) and "world size" in str(exc) \
                    and len(exc.args) == 1 and isinstance(exc.args[0], str):
                exc.args = (f"{exc.args[0]} A dist8 optimizer's state reloads at any world size: convert with "
                            f"`dist8 ckpt from-deepspeed {load_dir} OUT`, then "
                            "dist8.integrations.deepspeed.load_dist8_checkpoint(engine, OUT).",)
            raise

    def is_zero_supported_optimizer(optimizer):
        return isinstance(optimizer, Optimizer8bit) or orig_zero_supported(optimizer)

    _configure_basic_optimizer.__wrapped__ = orig_basic
    _configure_optimizer.__wrapped__ = orig_configure
    load_checkpoint.__wrapped__ = orig_load
    _state["originals"] = {"_configure_basic_optimizer": orig_basic, "_configure_optimizer": orig_configure,
                           "_is_supported_optimizer": orig_supported, "load_checkpoint": orig_load}
    Engine._is_supported_optimizer = _is_supported_optimizer
    Engine._configure_basic_optimizer = _configure_basic_optimizer
    Engine._configure_optimizer = _configure_optimizer
    Engine.load_checkpoint = load_checkpoint
    _state["module_originals"] = {"is_zero_supported_optimizer": orig_zero_supported}
    engine_module.is_zero_supported_optimizer = is_zero_supported_optimizer
    _state["installed"] = True


def uninstall() -> None:
    """Undo :func:`install`."""
    if not _state["installed"]:
        return
    _d, Engine = _require_deepspeed()
    import deepspeed.runtime.engine as engine_module

    for k, v in _state["originals"].items():
        setattr(Engine, k, v)
    for k, v in _state["module_originals"].items():
        setattr(engine_module, k, v)
    _state["installed"] = False


def is_installed() -> bool:
    return bool(_state["installed"])


def initialize(*args: Any, config: dict[str, Any] | str | os.PathLike | None = None,
               config_params: dict[str, Any] | str | os.PathLike | None = None,
               **kwargs: Any) -> tuple[DeepSpeedEngine, Any, Any, Any]:
    """:func:`install`, check the config, then ``deepspeed.initialize(...)`` (same arguments).

    Accepts a ``dist8.*`` optimizer section, or a dist8 optimizer instance (or a callable making one) as
    ``optimizer=``, not both: the instance gets the same per-parameter treatment of flat partitions
    (neither ``zero_allow_untested_optimizer`` nor ``zero_force_ds_cpu_optimizer: false`` is needed).
    DeepSpeed partitions and steps that instance itself, as with any torch optimizer: its
    ``param_groups`` then hold DeepSpeed's flat partitions, and an LR scheduler made on it keeps
    driving it. The same happens under plain ``deepspeed.initialize`` once the hook is installed.
    ``"auto"`` values left in the config mean DeepSpeed's defaults.

    Args:
        *args: ``deepspeed.initialize``'s positional arguments (``args``, ``model``, ...), passed on unchanged.
        config: the DeepSpeed config, a dict or the path of a JSON file: read, top-level ``"auto"``
            values dropped (``"enabled": "auto"`` turned off), its ``dist8.*`` optimizer section
            checked, then passed on as ``config=``. Default None.
        config_params: DeepSpeed's other name for ``config``, used (and passed on as ``config=``)
            when ``config`` is None, ignored otherwise. Default None.
        **kwargs: ``deepspeed.initialize``'s other keyword arguments (``model=``,
            ``model_parameters=``, ``optimizer=``, ...), passed on unchanged.

    Returns what ``deepspeed.initialize`` returns: ``(engine, optimizer, dataloader, lr_scheduler)``.
    Raises ImportError naming the install command when DeepSpeed is missing.
    """
    deepspeed, _ = _require_deepspeed()
    install()
    cfg = config if config is not None else config_params
    if cfg is not None:
        cfg = resolve_auto(load_config(cfg))
        check_config(cfg)
        kwargs["config"] = cfg
    return deepspeed.initialize(*args, **kwargs)


if env_flag("DIST8_DEEPSPEED", default=True):  # importing this module is the documented way to install
    try:
        install()
    except ImportError:  # no DeepSpeed: install()/initialize() raise INSTALL_HINT when called
        pass
