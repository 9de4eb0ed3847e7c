"""Validation of optimizer hyperparameters and parameters, shared by construction, ``add_param_group``,
name overrides and state-dict loading. Every error is one line naming the key and where it came from."""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from dist8.messages import brief
from dist8.quant.master import check_master_weight_bits

__all__ = [
    "FLAG_KEYS", "FLOAT32_MAX", "HYPER_BOUNDS", "SUPPORTED_DTYPES", "check_flag", "check_gradient", "check_group",
    "check_module", "check_number", "check_param_types", "check_unique_params", "pair",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: The kernels take every hyperparameter as float32: a larger finite number would reach them as inf.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_flag(value: Any, key: str) -> bool:
    """A bool (0 and 1 count), else ValueError naming ``key``: a tensor or a string here would
    otherwise fail later as "Boolean value of Tensor ... is ambiguous" or be read as True."""
    if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{key} must be True or False, got {brief(value)}")


def check_module(value: Any, what: str, optional: bool = False) -> None:
    """TypeError naming ``what`` unless ``value`` is a ``torch.nn.Module`` (or None when ``optional``): an
    optimizer given in the model's place (arguments swapped) failed deep inside with an AttributeError."""
    if (value is None and optional) or isinstance(value, torch.nn.Module):
        return
    swapped = " (model and optimizer swapped?)" if isinstance(value, torch.optim.Optimizer) else ""
    raise TypeError(f"{what} must be a torch.nn.Module{' or None' if optional else ''}, got "
                    f"{type(value).__name__}{swapped}")


def check_number(value: Any, key: str, where: str, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (a 0-d tensor counts) within the given bounds and float32's range (the
    kernels' type), else ValueError naming ``key``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex() and not value.is_meta:
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value):
        raise ValueError(f"{key} must be a finite number ({where}), got {brief(value)}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{key} must be within float32's range, |{key}| <= 3.4e38 ({where}), got {brief(value)}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"{key} must be {'>' if lo_open else '>='} {lo} ({where}), got {brief(value)}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"{key} must be {'<' if hi_open else '<='} {hi} ({where}), got {brief(value)}")
    return float(value)


def _finite(value: numbers.Real) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float's range: finite, and refused by the float32 range check
        return True


# Bounds of the hyperparameters dist8's families share by name: (lo, hi, lo_open, hi_open).
# dist8.checkpoint.groups holds a checkpoint's param_groups to the same table.
HYPER_BOUNDS = {
    "lr": (0.0, None, False, False),
    "eps": (0.0, None, False, False),
    "weight_decay": (0.0, None, False, False),
    "momentum": (0.0, 1.0, False, True),
    "dampening": (0.0, 1.0, False, True),
    # RMSprop's alpha (< 1) and AdEMAMix's alpha (slow-EMA weight, any >= 0) share the name:
    # the shared bound is >= 0; RMSprop's family checks alpha < 1 itself.
    "alpha": (0.0, None, False, False),
    "lr_decay": (0.0, None, False, False),
    "max_unorm": (0.0, None, False, False),
}


#: Group keys that are booleans, in any family that has them (checked wherever groups are).
FLAG_KEYS = ("maximize", "nesterov", "bias_correction", "adam_w_mode")


def check_group(group: dict[str, Any], where: str, n_betas: int = 2) -> None:
    """Check the hyperparameters every dist8 optimizer shares (``where`` names the group or override).

    NaN and inf are refused everywhere; ``betas`` must hold ``n_betas`` values (a pair; AdEMAMix:
    three) in [0, 1).
    """
    bits = group["optim_bits"]
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32 ({where}), got {brief(group['optim_bits'])}")
    if not isinstance(group["min_8bit_size"], int) or isinstance(group["min_8bit_size"], bool) or group["min_8bit_size"] < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int ({where}), got {brief(group['min_8bit_size'])}")
    check_number(group["percentile_clipping"], "percentile_clipping", where, lo=0.0, hi=100.0, lo_open=True)
    # the value only here (bf16 stands for "a 16-bit parameter"); which parameters it applies to: base.py
    check_master_weight_bits(group.get("master_weight_bits"), torch.bfloat16, where)
    for key, (lo, hi, lo_open, hi_open) in HYPER_BOUNDS.items():
        if key in group:
            check_number(group[key], key, where, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)
    for key in FLAG_KEYS:  # a string or None would be read by its truthiness ("no" meant True)
        if key in group:
            check_flag(group[key], f"{key} ({where})")
    if "betas" in group:
        betas = group["betas"]
        if isinstance(betas, (str, bytes)) or not isinstance(betas, Sequence) or len(betas) != n_betas:
            what = "a pair (beta1, beta2)" if n_betas == 2 else f"{n_betas} values (beta1, ..., beta{n_betas})"
            raise ValueError(f"betas must be {what} ({where}), got {brief(betas)}")
        for i, beta in enumerate(betas):
            check_number(beta, f"betas[{i}]", where, lo=0.0, hi=1.0, hi_open=True)


def check_gradient(p: torch.Tensor, name_of: Callable[[torch.Tensor], str]) -> None:
    """Refuse, naming the parameter (``name_of(p)``: asked only then, the step calls this per parameter), a
    gradient the kernels cannot take: sparse, of a dtype other than float32/bfloat16/float16, or of another
    shape than ``p``."""
    g = p.grad
    if g.layout != torch.strided:
        raise TypeError(f"parameter {name_of(p)} has a sparse gradient; dist8 needs dense gradients")
    if g.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"parameter {name_of(p)} has a {g.dtype} gradient; supported: float32, bfloat16, float16")
    if g.shape != p.shape:
        raise ValueError(f"parameter {name_of(p)} has shape {tuple(p.shape)} but its gradient {tuple(g.shape)}")


def check_param_types(params: Iterable[torch.Tensor], name_of: Callable[[torch.Tensor], str]) -> None:
    """Refuse complex parameters and dtypes other than float32/bfloat16/float16."""
    for p in params:
        if p.is_complex():
            raise TypeError(f"parameter {name_of(p)} is complex; dist8 optimizers need real tensors")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name_of(p)} has dtype {p.dtype}; supported: float32, bfloat16, float16")


def pair(value: Any) -> Any:
    """``betas`` as a tuple when it is a list or tuple (any length: :func:`check_group` checks it), else as given."""
    return tuple(value) if isinstance(value, (list, tuple)) else value


def check_unique_params(new: list[torch.Tensor], groups: list[dict[str, Any]], name_of: Callable[[torch.Tensor], str],
                        where: str, new_names: list[str] | None = None) -> None:
    """Refuse a parameter listed twice in the new group ``where`` or already in one of ``groups``.

    ``new_names``: the new group's ``param_names`` if it has them; else its parameters are called by
    their index in it (they are not registered yet, so ``name_of`` knows only the earlier groups').
    """
    def label(i: int) -> str:
        return new_names[i] if new_names is not None else f"index {i}"

    first: dict[torch.Tensor, int] = {}
    for i, p in enumerate(new):
        if p in first:
            raise ValueError(f"parameter {label(i)} is listed twice in {where} (also as {label(first[p])}); "
                             "list each parameter once")
        first[p] = i
    for gi, group in enumerate(groups):
        for q in group["params"]:
            if q in first:
                raise ValueError(f"parameter {label(first[q])} of {where} is already in param group {gi} "
                                 f"(as {name_of(q)}); list each parameter once")
