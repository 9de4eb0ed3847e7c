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
As in bitsandbytes, overrides are read at a parameter's first step: set them
before it (they may be set after the optimizer was built).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from dist8.optim.config import OVERRIDABLE_KEYS, OVERRIDE_ATTR

__all__ = ["GlobalOptimManager", "restore_module_marks"]

_UNSET = object()


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
        """Accepted for bitsandbytes compatibility; dist8 needs no registration.

        (bitsandbytes maps overrides by parameter position so they survive a module
        move that replaces parameter objects; dist8 marks the parameter object, and
        ``Module.to``/``cuda`` keep parameter objects.)
        """
        groups = list(params)
        if groups and not isinstance(groups[0], Mapping):
            groups = [{"params": groups}]
        for gi, group in enumerate(groups):
            plist = group["params"]
            for pi, p in enumerate([plist] if isinstance(plist, torch.Tensor) else plist):
                if id(p) in self.pid2config:
                    self.index2config[(gi, pi)] = self.pid2config[id(p)]

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


def restore_module_marks() -> None:
    """Mark again the parameters of ``register_module_override`` that lost their mark.

    torch.utils.swap_tensors (``Module.to`` / ``to_empty`` on FSDP2 models, any module under
    ``torch.__future__.set_swap_module_params_on_conversion``) exchanges a parameter's attributes, and
    ``load_state_dict(assign=True)`` puts in a new parameter: the override would silently not apply.
    A module override names the module's attribute, so it finds the current parameter (as
    bitsandbytes resolves it). Dist8 optimizers call this when built and before each step.
    """
    mng = GlobalOptimManager._instance
    if mng is None:
        return
    for module, name, config in mng.module_weight_config_triple:
        p = getattr(module, name, None)
        if isinstance(p, torch.Tensor) and getattr(p, OVERRIDE_ATTR, None) is None:
            mng._mark(p, config)
