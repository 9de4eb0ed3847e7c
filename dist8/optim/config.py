"""Per-parameter configuration: names, overrides and the 8-bit vs 32-bit decision.

Decisions use the *global* parameter (its full element count and its name), never
a shard, so that wrapping, flattening or sharding cannot change them.
"""
from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ["OVERRIDABLE_KEYS", "OVERRIDE_ATTR", "GLOBAL_NUMEL_ATTR", "PIECE_START_ATTR", "PARAM_LIST_KEYS",
           "hyperparameters_of",
           "positional_name", "fits_param_names", "load_group_values", "loaded_hyperparameters",
           "master_weight_bits_after_load", "name_every_group", "split_named_params",
           "match_overrides", "check_overrides_match", "global_numel", "uses_8bit", "TORCH_STEP_FLAGS",
           "unknown_arguments_message", "fixed_lr_override_message", "STATE_KIND_KEYS",
           "KEYS_STATE_DEPENDS_ON"]

# Modules (e.g. StableEmbedding) mark parameters that need special optimizer settings.
OVERRIDE_ATTR = "_dist8_overrides"
# Set by wrappers whose parameters are shards, so decisions use the full size.
GLOBAL_NUMEL_ATTR = "_dist8_global_numel"
# Set by wrappers whose parameters are shards: the element offset of the piece in its parameter (the
# piece at 0 counts a skip of the whole parameter, so that the counts summed over ranks are the unsharded run's).
PIECE_START_ATTR = "_dist8_piece_start"

OVERRIDABLE_KEYS = frozenset(
    {"optim_bits", "lr", "betas", "eps", "weight_decay", "momentum", "alpha", "min_8bit_size", "percentile_clipping",
     "master_weight_bits"}
)


# The per-parameter lists of a param group: its tensors and, when the optimizer was given named
# parameters, their names (torch.optim keeps them as ``param_names`` and returns them in
# ``state_dict()``). Every other entry of a group is a hyperparameter.
PARAM_LIST_KEYS = ("params", "param_names")


def hyperparameters_of(group: Mapping[str, Any]) -> dict[str, Any]:
    """A param group's hyperparameters: every entry but the lists of :data:`PARAM_LIST_KEYS`."""
    return {k: v for k, v in group.items() if k not in PARAM_LIST_KEYS}


def positional_name(group_index: int, index: int) -> str:
    """What a parameter given without a name is called: its position ``group G index I``."""
    return f"group {group_index} index {index}"


def fits_param_names(names: Any, n_params: int) -> bool:
    """Whether ``names`` (a group's ``param_names``) lists one string per parameter. Wrappers that
    repartition param groups (DeepSpeed's flat partitions, ZeRO-style optimizers copying a group for
    a subset of its parameters) can leave stale lists behind; those are not names."""
    return (isinstance(names, (list, tuple)) and len(names) == n_params
            and all(isinstance(n, str) for n in names))


def master_weight_bits_after_load(saved: Any, own: Any) -> Any:
    """The ``master_weight_bits`` a param group keeps when a state dict or checkpoint saved with ``saved``
    is loaded into it (``own``: the optimizer's).

    The saved value replaces the optimizer's, as every hyperparameter does (torch's rule: the saved
    corrections come back with the setting that made them), except that a saved ``None`` (an fp32 or
    plain 16-bit run, which has no corrections) keeps ``own``: taken from such a run, ``None``
    silently turned an optimizer built with ``master_weight_bits=24`` into pure bf16 training. Its
    corrections then start from the loaded weights (``dist8.checkpoint.load`` encodes an fp32
    checkpoint's weights into them). (``ShardedOptimizer`` chooses whether to keep fp32 master copies when
    built, and ``dist8.checkpoint.load`` refuses a saved value that would change that -- a saved 24 or 32 into
    one built with None; 24 and 32 replace each other.)
    """
    return own if saved is None else saved


def loaded_hyperparameters(group: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, Any]:
    """``group``'s hyperparameters once ``saved`` (a loaded state dict's or checkpoint's group) is loaded:
    the saved values replace the group's (torch's rule), ``master_weight_bits`` as
    :func:`master_weight_bits_after_load` says."""
    values = dict(hyperparameters_of(group))
    values.update(hyperparameters_of(saved))
    if "master_weight_bits" in saved or "master_weight_bits" in group:
        values["master_weight_bits"] = master_weight_bits_after_load(saved.get("master_weight_bits"),
                                                                     group.get("master_weight_bits"))
    return values


#: Group values that decide each parameter's kind of state (8-bit codes or fp32): a loaded group's replace
#: the optimizer's (torch's rule) and the saved state keeps its kind, so a different constructor value is
#: said (an optimizer built with optim_bits=32 went on in 8 bits after loading an 8-bit state, silently).
STATE_KIND_KEYS = ("optim_bits", "min_8bit_size")
#: Group values the existing state may not follow when they change after a parameter's first step
#: (``Optimizer8bit.check_state_fits``): its 8- or 32-bit kind, and percentile clipping's history.
KEYS_STATE_DEPENDS_ON = STATE_KIND_KEYS + ("percentile_clipping",)


def load_group_values(group: dict[str, Any], saved: Mapping[str, Any], warn: bool = True) -> str | None:
    """Give the live param ``group`` the values of its ``saved`` counterpart (a loaded state dict's,
    already validated): every hyperparameter (:func:`loaded_hyperparameters`), and torch's rule for
    names: the saved ``param_names`` replace the group's where they fit (:func:`fits_param_names`).

    When a :data:`STATE_KIND_KEYS` value differs from the group's: warns (``warn``), or returns the
    warning for the caller to give once everything is loaded (with warnings as errors, a warning in the
    middle of a load would leave it half done); None otherwise."""
    changed = [f"{key}={saved[key]!r} (this optimizer: {group[key]!r})" for key in STATE_KIND_KEYS
               if key in saved and key in group and saved[key] != group[key]]
    group.update(loaded_hyperparameters(group, saved))
    if fits_param_names(saved.get("param_names"), len(group["params"])):
        group["param_names"] = list(saved["param_names"])
    if not changed:
        return None
    message = (f"the loaded state dict's param group has {', '.join(changed)}: loaded values replace the "
               "optimizer's (torch's rule) and the saved state keeps its 8-bit/32-bit kind; to change "
               "it, do not load the optimizer state (it starts afresh)")
    if warn:
        warnings.warn(message, UserWarning, stacklevel=3)
    return message


def name_every_group(groups: list[dict], first_index: int = 0) -> None:
    """Give every group without ``param_names`` its parameters' positional names (``groups[i]`` is
    param group ``first_index + i``), so that named and unnamed groups can be mixed: torch.optim
    needs all groups to have ``param_names`` or none."""
    for gi, group in enumerate(groups, start=first_index):
        if "param_names" not in group:
            group["param_names"] = [positional_name(gi, pi) for pi in range(len(group["params"]))]


def split_named_params(params: Any, first_index: int = 0) -> tuple[list[dict], dict[torch.Tensor, str]]:
    """Normalise ``params`` (tensors, ``(name, tensor)`` pairs or param-group dicts; the first of them
    is param group ``first_index``).

    Returns param groups holding plain tensors and a map from parameter to name. As in
    ``torch.optim``, parameters given with names are listed under each group's ``param_names``
    (and so in ``state_dict()``); a parameter without a name next to named ones is listed by its
    position (:func:`positional_name`). A group may also carry torch's ``param_names`` list itself
    (ignored unless it has one string per parameter, see :func:`fits_param_names`).
    """
    if isinstance(params, torch.nn.Module):  # iterating a Sequential gives its layers
        raise TypeError(f"params is a torch.nn.Module ({type(params).__name__}): pass model.parameters() or "
                        "model.named_parameters()")
    if isinstance(params, (torch.Tensor, str, bytes, Mapping)) or not isinstance(params, Iterable):
        kind = "a Tensor" if isinstance(params, torch.Tensor) else type(params).__name__
        raise TypeError(f"params must be an iterable of tensors, (name, tensor) pairs or dicts, got {kind}")
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list")
    groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    names: dict[torch.Tensor, str] = {}
    out: list[dict] = []
    for gi, group in enumerate(groups, start=first_index):
        if not isinstance(group, Mapping):
            raise TypeError(f"param group {gi} is of type {type(group).__name__}; a params list is all dicts "
                            "(param groups) or none")
        group = dict(group)
        if "params" not in group:
            raise ValueError(f"param group {gi} has no 'params' entry")
        plist = group["params"]
        if isinstance(plist, (str, bytes, Mapping)) or not isinstance(plist, (torch.Tensor, Iterable)):
            raise TypeError(f"param group {gi}: params must be a tensor or an iterable of tensors, "
                            f"got {type(plist).__name__}")
        plist = [plist] if isinstance(plist, torch.Tensor) else list(plist)
        tensors, group_names = [], []
        for pi, entry in enumerate(plist):
            name = None
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
                name, entry = entry
            if not isinstance(entry, torch.Tensor):
                raise TypeError(f"param group {gi} entry {pi} is of type {type(entry).__name__}, not a tensor")
            tensors.append(entry)
            group_names.append(name)
        given = group.pop("param_names", None)
        if fits_param_names(given, len(tensors)):
            group_names = [n if n is not None else g for n, g in zip(group_names, given)]
        if any(n is not None for n in group_names):
            names.update((t, n) for t, n in zip(tensors, group_names) if n is not None)
            group["param_names"] = [n if n is not None else positional_name(gi, pi) for pi, n in enumerate(group_names)]
        group["params"] = tensors
        out.append(group)
    if any("param_names" in g for g in out):
        name_every_group(out, first_index)
    return out, names


def fixed_lr_override_message(name: str, lr: Any) -> str:
    """The warning for an ``lr`` override met with an LR scheduler (the group has ``initial_lr``)."""
    return (f"parameter {name} has an lr override ({lr!r}), which is fixed: LR schedulers change the param groups' "
            "lr, not overrides (as with bitsandbytes' GlobalOptimManager). To schedule it, give it a param group of "
            "its own with that lr")


def match_overrides(name: str | None, param: torch.Tensor, overrides: Mapping[str, Mapping[str, Any]]) -> dict:
    """Settings for one parameter: its module's marks, then name patterns (fnmatch), later wins."""
    found: dict[str, Any] = dict(getattr(param, OVERRIDE_ATTR, {}) or {})
    if name is not None:
        for pattern, settings in overrides.items():
            if fnmatch.fnmatchcase(name, pattern):
                found.update(settings)
    return found


def check_overrides_match(overrides: Mapping[str, Mapping[str, Any]], names: Iterable[str]) -> None:
    """Refuse an ``overrides`` pattern that matches none of ``names`` (all the optimizer's parameter
    names): a typo would silently leave the parameter at the defaults."""
    names = list(names)
    if overrides and not names:
        raise ValueError("overrides match parameter names, and these parameters have none: pass "
                         "model.named_parameters() (or (name, parameter) pairs), or mark modules with "
                         "dist8.GlobalOptimManager (for clients that pass unnamed groups, e.g. HF Trainer)")
    for pattern in overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise ValueError(f"overrides pattern {pattern!r} matches no parameter name (names look like "
                             f"{', '.join(names[:4])}; a tied weight, e.g. lm_head.weight = wte.weight, is "
                             f"named once, by its first module)")


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


# torch.optim's implementation switches: dist8 has one implementation (a fused kernel per step).
TORCH_STEP_FLAGS = frozenset({"foreach", "fused", "capturable", "differentiable"})


def unknown_arguments_message(class_name: str, unknown: dict) -> str:
    """The one-line TypeError for keyword arguments an optimizer does not take, with a hint for
    torch.optim's implementation switches (code written for ``torch.optim.AdamW(fused=True)``)."""
    names = sorted(unknown)
    message = f"{class_name} got unexpected keyword argument(s) {', '.join(repr(n) for n in names)}"
    if set(names) & TORCH_STEP_FLAGS:
        message += ("; torch.optim's foreach/fused/capturable/differentiable choose between torch's "
                    "implementations, dist8 always runs its own fused kernel: drop them")
    return message
