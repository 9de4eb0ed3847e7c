"""``GlobalOptimManager``: bitsandbytes' per-parameter override registry, on dist8's parameter marks.

Code written for ``bitsandbytes.optim.GlobalOptimManager`` (for example the
Hugging Face recipe that keeps embeddings in 32 bits) works unchanged::

    mng = dist8.optim.GlobalOptimManager.get_instance()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            mng.register_module_override(module, "weight", {"optim_bits": 32})

Each override becomes a mark on the parameter object itself (the attribute
``dist8.optim.config.OVERRIDE_ATTR`` that ``StableEmbedding`` also uses). Every dist8
optimizer reads the marks when it first steps a parameter, together with its
``overrides={"name-pattern": {...}}`` (name patterns win over marks), and the marks
travel with the parameter into ``ShardedOptimizer``, FSDP2 (``dist8.integrations.fsdp``)
and DeepSpeed, so the 32-bit decision is taken on the whole parameter there too.
As in bitsandbytes, overrides are read at every step: one set after a parameter's first step
applies from the next (the optimizer resolves a parameter's settings again when its mark is
replaced); the kind of state (``optim_bits``, ``min_8bit_size``) is made at the first step, and a
later change of it is refused at the step, naming the parameter.

Marks live on parameter objects, and some code replaces them (torch's ``fully_shard``,
``load_state_dict(assign=True)``, ``emb.weight = ...``, ``copy.deepcopy``). Settings that name a
module's attribute survive that: :func:`mark_module_attribute` (layers' own marks, e.g.
``dist8.nn.Embedding``'s 32-bit state) and ``register_module_override`` are applied again to the
attribute's current tensor by :func:`restore_module_marks`, which dist8 optimizers run when built and
before each step. ``register_parameters`` records overrides by position, as bitsandbytes does:
:func:`apply_positional_configs` gives them to the parameters at those positions when an optimizer is built.
In every case a key the parameter's mark already has wins (an override set after the replacement is kept).
"""
from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.nn.utils import parametrize

from dist8.optim.config import GLOBAL_NUMEL_ATTR, OVERRIDABLE_KEYS, OVERRIDE_ATTR

__all__ = ["GlobalOptimManager", "restore_module_marks", "mark_module_attribute", "missing_marks", "merge_marks",
           "apply_positional_configs"]

_UNSET = object()

# module -> {attribute name: settings} of layers that mark their own tensors (mark_module_attribute).
# Modules, not tensors, are referenced (weakly: a model that is freed leaves): a weak reference to a
# tensor would make torch.utils.swap_tensors refuse it.
_LAYER_MARKS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, dict[str, Any]]] = weakref.WeakKeyDictionary()


class GlobalOptimManager:
    """Process-wide registry of per-parameter optimizer settings (bitsandbytes-compatible).

    Get it with :meth:`get_instance` (the constructor refuses, as bitsandbytes' does).
    Attributes kept for code that reads them: ``pid2config`` (``id(param)`` -> settings)
    and ``module_weight_config_triple`` (``(module, attribute, settings)``).
    Valid setting keys are those of dist8's ``overrides`` (``optim_bits``, ``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``momentum``, ``alpha``, ``min_8bit_size``,
    ``percentile_clipping``); any other key is refused with a ``ValueError`` naming it.
    """

    _instance: GlobalOptimManager | None = None

    def __init__(self) -> None:
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        """The one manager of this process."""
        if cls._instance is None:
            inst = cls.__new__(cls)
            inst._marked = []
            inst.initialize()
            cls._instance = inst
        return cls._instance

    def initialize(self) -> None:
        """Forget every override and take back the marks this manager put on parameters."""
        for attrs, previous in reversed(getattr(self, "_marked", [])):
            if previous is _UNSET:
                attrs.pop(OVERRIDE_ATTR, None)
            else:
                attrs[OVERRIDE_ATTR] = previous
        # (the attribute dict of each parameter marked, and its mark before): no reference to the tensor,
        # whose weak references would make torch.utils.swap_tensors (Module.to on FSDP2 models) refuse it
        self._marked: list[tuple[dict, Any]] = []
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict[str, Any]]] = []

    def register_parameters(self, params: Iterable) -> None:
        """Record the overrides of ``params`` (tensors or param-group dicts) by position, as bitsandbytes does.

        Each parameter of ``params`` that has an ``override_config`` override gives its settings to its
        (group index, position); a dist8 optimizer built later applies them to the parameter it finds
        there (:func:`apply_positional_configs`), so they survive new parameter objects
        (``copy.deepcopy``, torch's ``fully_shard``, ``load_state_dict(assign=True)``) if the optimizer
        lists the parameters in the same order. As in bitsandbytes, these apply to every optimizer
        built afterwards, until :meth:`initialize`.
        """
        groups = list(params)
        if groups and not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            plist = group["params"]
            for pi, p in enumerate([plist] if isinstance(plist, torch.Tensor) else plist):
                if id(p) in self.pid2config:
                    self.index2config[(gi, pi)] = self.pid2config[id(p)]

    def positional_config(self, group_index: int, position: int) -> dict[str, Any] | None:
        """The settings ``register_parameters`` recorded for parameter ``position`` of param group
        ``group_index`` (a copy), or None."""
        config = self.index2config.get((group_index, position))
        return dict(config) if config else None

    def override_config(
        self,
        parameters: torch.Tensor | Iterable[torch.Tensor],
        key: str | None = None,
        value: Any = None,
        key_value_dict: Mapping[str, Any] | None = None,
    ) -> None:
        """Override settings of ``parameters``: one ``key``/``value`` or a ``key_value_dict``.

        Example: ``override_config(model.fc1.weight, "optim_bits", 32)``.
        """
        if key is not None and key_value_dict is not None:
            raise ValueError("pass either key/value or key_value_dict, not both")
        if key is not None:
            key_value_dict = {key: value}
        if key_value_dict is None:
            return
        config = self._checked(key_value_dict, "override_config")
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"override_config takes parameters (tensors), got {type(p).__name__}")
            self.pid2config.setdefault(id(p), {}).update(config)
            self._mark(p, config)

    def register_module_override(self, module: torch.nn.Module, param_name: str, config: Mapping[str, Any]) -> None:
        """Override settings of ``getattr(module, param_name)`` (e.g. an embedding's ``"weight"``)."""
        config = self._checked(config, "register_module_override")
        p = getattr(module, param_name, None)
        if not isinstance(p, torch.Tensor):
            raise AttributeError(f"{type(module).__name__} has no tensor attribute {param_name!r} to override")
        self.module_weight_config_triple.append((module, param_name, config))
        self.pid2config.setdefault(id(p), {}).update(config)
        self._mark(p, config)

    # ---- internals --------------------------------------------------------------------------
    @staticmethod
    def _checked(config: Mapping[str, Any], where: str) -> dict[str, Any]:
        if not isinstance(config, Mapping):
            raise TypeError(f"{where}: settings must be a dict, got {type(config).__name__}")
        unknown = set(config) - OVERRIDABLE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; valid keys: {sorted(OVERRIDABLE_KEYS)}")
        return dict(config)

    def _mark(self, p: torch.Tensor, config: dict[str, Any]) -> None:
        previous = getattr(p, OVERRIDE_ATTR, _UNSET)
        self._marked.append((p.__dict__, previous))
        merged = dict(previous) if isinstance(previous, Mapping) else {}
        merged.update(config)
        setattr(p, OVERRIDE_ATTR, merged)  # a new dict: a module's shared marks are never mutated

    def _mark_missing(self, p: torch.Tensor, config: Mapping[str, Any]) -> None:
        missing = missing_marks(p, config)
        if missing:
            self._mark(p, missing)


def missing_marks(p: torch.Tensor, config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of ``config`` whose keys ``p``'s mark lacks (the keys it has win)."""
    current = getattr(p, OVERRIDE_ATTR, None) or {}
    return {k: v for k, v in config.items() if k not in current}


def merge_marks(p: torch.Tensor, config: Mapping[str, Any]) -> None:
    """Add to ``p``'s mark the settings of ``config`` it lacks; a key the mark already has wins (an
    override set after a parameter was replaced is kept). The mark is replaced by a new dict, never
    mutated: it may be shared (a swap's old parameter, a module's own mark)."""
    missing = missing_marks(p, config)
    if missing:
        setattr(p, OVERRIDE_ATTR, {**(getattr(p, OVERRIDE_ATTR, None) or {}), **missing})


def _attribute_tensor(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    if parametrize.is_parametrized(module, name):  # the parameter itself, not a tensor computed per access
        return module.parametrizations[name].original
    p = getattr(module, name, None)
    return p if isinstance(p, torch.Tensor) else None


def mark_module_attribute(module: torch.nn.Module, name: str, config: Mapping[str, Any]) -> None:
    """Mark ``getattr(module, name)`` with ``config`` now and whenever it lacks those keys later.

    For layers that own a setting of their tensor (``dist8.nn.Embedding``: ``{"optim_bits": 32}``).
    The module is remembered, weakly, and :func:`restore_module_marks` marks the tensor the attribute
    holds then: a replaced weight (``emb.weight = ...``, torch's ``fully_shard``, Hugging Face's
    ``resize_token_embeddings`` under ZeRO-3) keeps the setting, as bitsandbytes' module overrides do.
    Unlike ``register_module_override``, these marks are the layer's: ``GlobalOptimManager.initialize``
    keeps them. Calling it again for the same attribute replaces its settings.
    """
    config = GlobalOptimManager._checked(config, "mark_module_attribute")
    _LAYER_MARKS.setdefault(module, {})[name] = config
    p = _attribute_tensor(module, name)
    if p is not None:
        merge_marks(p, config)


def restore_module_marks() -> None:
    """Mark again the tensors of ``register_module_override`` and :func:`mark_module_attribute` that lack
    their settings.

    torch.utils.swap_tensors (``Module.to`` / ``to_empty`` on FSDP2 models, any module under
    ``torch.__future__.set_swap_module_params_on_conversion``) exchanges a parameter's attributes;
    ``load_state_dict(assign=True)``, torch's ``fully_shard`` and attribute assignment put in a new
    parameter: the setting would silently not apply. These settings name the module's attribute, so
    they find the current parameter (as bitsandbytes resolves module overrides). Keys the parameter's
    mark already has win. Dist8 optimizers call this when built and before each step.
    """
    for module, configs in list(_LAYER_MARKS.items()):
        for name, config in configs.items():
            p = _attribute_tensor(module, name)
            if p is not None:
                merge_marks(p, config)
    mng = GlobalOptimManager._instance
    if mng is None:
        return
    for module, name, config in mng.module_weight_config_triple:
        p = _attribute_tensor(module, name)
        if p is not None:
            mng._mark_missing(p, config)


def apply_positional_configs(param_groups: list[dict]) -> None:
    """Give each parameter of ``param_groups`` the settings ``register_parameters`` recorded for its
    (group index, position), as bitsandbytes applies ``index2config``; keys its mark has win.

    Run by dist8 optimizers when built, before the marks are read. Pieces of a sharded wrapper's
    inner optimizer (they carry ``GLOBAL_NUMEL_ATTR``) are left alone: their positions are not the user's.
    """
    mng = GlobalOptimManager._instance
    if mng is None or not mng.index2config:
        return
    for gi, group in enumerate(param_groups):
        for pi, p in enumerate(group["params"]):
            config = mng.positional_config(gi, pi)
            if config and isinstance(p, torch.Tensor) and not hasattr(p, GLOBAL_NUMEL_ATTR):
                mng._mark_missing(p, config)
