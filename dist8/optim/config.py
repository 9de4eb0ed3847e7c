"""Per-parameter configuration: names, overrides and the 8-bit vs 32-bit decision.

Decisions use the *global* parameter (its full element count and its name), never
a shard, so that wrapping, flattening or sharding cannot change them.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["OVERRIDABLE_KEYS", "OVERRIDE_ATTR", "GLOBAL_NUMEL_ATTR", "split_named_params", "match_overrides", "global_numel", "uses_8bit"]

# Modules (e.g. StableEmbedding) mark parameters that need special optimizer settings.
OVERRIDE_ATTR = "_dist8_overrides"
# Set by wrappers whose parameters are shards, so decisions use the full size.
GLOBAL_NUMEL_ATTR = "_dist8_global_numel"

OVERRIDABLE_KEYS = frozenset(
    {"optim_bits", "lr", "betas", "eps", "weight_decay", "momentum", "alpha", "min_8bit_size", "percentile_clipping",
     "master_weight_bits"}
)


def split_named_params(params: Any) -> tuple[list[dict], dict[torch.Tensor, str]]:
    """Normalise ``params`` (tensors, ``(name, tensor)`` pairs or param-group dicts).

    Returns param groups holding plain tensors and a map from parameter to name.
    """
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, (name, tensor) pairs or dicts, got a Tensor")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    names: dict[torch.Tensor, str] = {}
    out: list[dict] = []
    for gi, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise TypeError(f"param group {gi} is a {type(group).__name__}; mix of dicts and tensors is not allowed")
        group = dict(group)
        plist = group["params"]
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        tensors = []
        for pi, entry in enumerate(plist):
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                name, tensor = entry
                names[tensor] = name
            else:
                tensor = entry
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"param group {gi} entry {pi} is a {type(tensor).__name__}, not a tensor")
            tensors.append(tensor)
        group["params"] = tensors
        out.append(group)
    return out, names


def match_overrides(name: str | None, param: torch.Tensor, overrides: Mapping[str, Mapping[str, Any]]) -> dict:
    """Settings for one parameter: its module's marks, then name patterns (fnmatch), later wins."""
    found: dict[str, Any] = dict(getattr(param, OVERRIDE_ATTR, {}) or {})
    if name is not None:
        for pattern, settings in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                found.update(settings)
    return found


def check_overrides(overrides: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """Validate an ``overrides={"pattern": {key: value}}`` argument."""
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"overrides must be a dict of pattern -> settings, got {type(overrides).__name__}")
    checked = {}
    for pattern, settings in overrides.items():
        if not isinstance(pattern, str) or not isinstance(settings, Mapping):
            raise TypeError(f"overrides[{pattern!r}] must map a name pattern (str) to a dict of settings")
        unknown = set(settings) - OVERRIDABLE_KEYS
        if unknown:
            raise ValueError(
                f"overrides[{pattern!r}] has unknown key(s) {sorted(unknown)}; valid keys: {sorted(OVERRIDABLE_KEYS)}"
            )
        checked[pattern] = dict(settings)
    return checked


def global_numel(param: torch.Tensor) -> int:
    """Element count of the whole parameter (a DTensor's global size, or a wrapper's mark)."""
    marked = getattr(param, GLOBAL_NUMEL_ATTR, None)
    return int(marked) if marked is not None else param.numel()


def uses_8bit(optim_bits: int, min_8bit_size: int, numel: int) -> bool:
    """8-bit state iff ``optim_bits == 8`` and the global parameter has >= ``min_8bit_size`` elements."""
    return optim_bits == 8 and numel >= min_8bit_size
