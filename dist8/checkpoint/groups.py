"""Validation of the hyperparameters (``param_groups``) a checkpoint would install.

A checkpoint's ``param_groups`` replace the optimizer's values on load, so they get the
constructor's rules: each value must have the type the optimizer holds (number, bool,
flat list of the same length, string), be finite, and lie in the key's range (lr, eps,
weight_decay >= 0, betas in [0, 1), ...). A refusal names the group and key.

Types and finiteness are checked here (JSON can hold anything); the ranges are then the
optimizer's own, through ``Optimizer8bit.validate_hyper`` (the table below, derived from the
optimizers' bounds, also serves ``dist8 ckpt verify``, which has no optimizer).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.format import from_numpy_scalar
from dist8.optim.config import PARAM_LIST_KEYS, hyperparameters_of, master_weight_bits_after_load
from dist8.optim.validation import FLOAT32_MAX, HYPER_BOUNDS

__all__ = ["check_saved_groups", "checked_groups"]

# key -> (low, high, low inclusive, high inclusive): the optimizers' own bounds
# (dist8.optim.validation.HYPER_BOUNDS, open ones ending at float32's largest value, as the
# kernels take them), plus the three check_group encodes inline.
_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    key: (lo, FLOAT32_MAX if hi is None else hi, not lo_open, not hi_open)
    for key, (lo, hi, lo_open, hi_open) in HYPER_BOUNDS.items()
}
_RANGES.update(betas=(0.0, 1.0, True, False), percentile_clipping=(0.0, 100.0, False, True),
               min_8bit_size=(0.0, math.inf, True, False))
_CHOICES = {"optim_bits": (8, 32)}
# Keys whose value is None or a number (AdEMAMix's warm-up lengths; master_weight_bits, whose
# correction the checkpoint holds in its own kind): either may replace the other; the optimizer's
# validate_hyper then checks the value.
_NONE_OR_NUMBER = ("t_alpha", "t_beta3", "master_weight_bits")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_value(key: str, value: Any, where: str) -> None:
    if not math.isfinite(value):
        raise CheckpointError(f"{where}: {key} is {value}, not a finite number")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise CheckpointError(f"{where}: {key} must be one of {_CHOICES[key]}, got {value}")
    rng = _RANGES.get(key.split("[")[0])
    if rng is not None:
        lo, hi, lo_in, hi_in = rng
        if not ((value >= lo if lo_in else value > lo) and (value <= hi if hi_in else value < hi)):
            raise CheckpointError(f"{where}: {key} = {value} is outside {'[' if lo_in else '('}{lo}, "
                                  f"{hi}{']' if hi_in else ')'}")


def _converted(key: str, saved: Any, current: Any, where: str) -> Any:
    """``saved`` in the type of ``current`` after checking it, else CheckpointError."""
    current = from_numpy_scalar(current)  # np.bool_, np.float32: their Python value's kind (saved is JSON)
    if key in _NONE_OR_NUMBER and (saved is None or _number(saved)) and (current is None or _number(current)):
        if saved is not None:
            _check_value(key, saved, where)
        return saved
    if isinstance(current, bool):
        if not isinstance(saved, bool):
            raise CheckpointError(f"{where}: {key} must be true/false like the optimizer's, got {saved!r}")
        return saved
    if isinstance(current, torch.Tensor) and current.numel() == 1:
        if not _number(saved):
            raise CheckpointError(f"{where}: {key} must be a number, got {saved!r}")
        _check_value(key, saved, where)
        return torch.tensor(saved, dtype=current.dtype, device=current.device).reshape(current.shape)
    if _number(current):
        if saved is None:
            raise CheckpointError(f"{where}: {key} is null in the checkpoint, {current!r} in the optimizer")
        if not _number(saved) or (isinstance(current, int) and key in ("min_8bit_size", "optim_bits")
                                  and not isinstance(saved, int)):
            raise CheckpointError(f"{where}: {key} must be a number like the optimizer's {current!r}, got {saved!r}")
        _check_value(key, saved, where)
        return saved
    if isinstance(current, (tuple, list)):
        if not isinstance(saved, list) or len(saved) != len(current):
            raise CheckpointError(f"{where}: {key} must be a list of {len(current)} like the optimizer's, "
                                  f"got {saved!r}")
        out = [_converted(f"{key}[{i}]", s, c, where) for i, (s, c) in enumerate(zip(saved, current))]
        return tuple(out) if isinstance(current, tuple) else out
    if current is None or isinstance(current, str):
        if saved is not None and not isinstance(saved, str):
            raise CheckpointError(f"{where}: {key} must be a string or null like the optimizer's, got {saved!r}")
        return saved
    raise CheckpointError(f"{where}: {key} holds a {type(current).__name__} in the optimizer, "
                          "which a checkpoint cannot set")


def checked_groups(saved_groups: list[dict[str, Any]], groups: list[dict[str, Any]], where: str,
                   validate: Callable[[dict[str, Any], str], None] | None = None,
                   fixed_master_weight_bits: bool = False) -> list[dict[str, Any]]:
    """The values each of the optimizer's ``groups`` gets from ``saved_groups``, validated (not applied).

    Keys the optimizer's group does not have are ignored (they cannot affect it). ``validate``
    (``Optimizer8bit.validate_hyper``) then checks each resulting group with the constructor's rules.
    """
    if len(saved_groups) != len(groups):
        raise CheckpointError(f"{where}: the checkpoint has {len(saved_groups)} param groups, "
                              f"the optimizer {len(groups)}")
    out = []
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        at = f"{where}: param group {gi}"
        values = {}
        for key, value in saved.items():
            if key in PARAM_LIST_KEYS or key not in group:
                continue
            values[key] = _converted(key, value, group[key], at)
        if "master_weight_bits" in values:  # a saved None keeps the optimizer's own (an fp32 run has no corrections)
            values["master_weight_bits"] = master_weight_bits_after_load(values["master_weight_bits"],
                                                                         group.get("master_weight_bits"))
            # 24 <-> 32 is a correction of another width, which the step re-encodes; None <-> 24/32 would change
            # whether the ShardedOptimizer keeps fp32 master copies, which it decides when built
            if fixed_master_weight_bits and (values["master_weight_bits"] is None) != (
                    group.get("master_weight_bits") is None):
                raise CheckpointError(f"{at} was saved with master_weight_bits={values['master_weight_bits']!r}, "
                                      f"this ShardedOptimizer was built with {group.get('master_weight_bits')!r} "
                                      "(it chooses its master copies when built)")
        if "nesterov" in group and values.get("nesterov", group["nesterov"]) and values.get(
                "dampening", group.get("dampening", 0)) != 0:
            raise CheckpointError(f"{at}: nesterov=True requires dampening=0")
        if validate is not None:
            try:
                validate(dict(hyperparameters_of(group), **values), f"param group {gi}")
            except (ValueError, TypeError, KeyError) as exc:
                raise CheckpointError(f"{where}: {' '.join(str(exc).split())}") from None
        out.append(values)
    return out


def check_saved_groups(saved_groups: list[dict[str, Any]], where: str) -> None:
    """Check ``saved_groups`` without an optimizer (``dist8 ckpt verify``): known keys must be numbers in range."""
    templates = []
    for g in saved_groups:
        t = {}
        for k, v in g.items():
            if k == "betas":
                t[k] = tuple(0.0 for _ in v) if isinstance(v, list) and len(v) in (2, 3) else (0.0, 0.0)
            elif k in _RANGES or k in _CHOICES:
                t[k] = 0 if k in ("optim_bits", "min_8bit_size") else 0.0
            else:
                t[k] = v
        templates.append(t)
    checked_groups(saved_groups, templates, where)
