"""Validation of optimizer hyperparameters and parameters, shared by construction, ``add_param_group``,
name overrides and state-dict loading. Every error is one line naming the key and where it came from."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = ["SUPPORTED_DTYPES", "check_group", "check_param_types"]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_group(group: dict[str, Any], where: str) -> None:
    """Check the hyperparameters every dist8 optimizer shares (``where`` names the group or override)."""
    if group["optim_bits"] not in (8, 32):
        raise ValueError(f"optim_bits must be 8 or 32 ({where}), got {group['optim_bits']}")
    if not isinstance(group["min_8bit_size"], int) or group["min_8bit_size"] < 0:
        raise ValueError(f"min_8bit_size must be a non-negative int ({where}), got {group['min_8bit_size']}")
    if not 0 < group["percentile_clipping"] <= 100:
        raise ValueError(f"percentile_clipping must be in (0, 100] ({where}), got {group['percentile_clipping']}")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        lr = float(lr)
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0 ({where}), got {group['lr']}")
    if "weight_decay" in group and group["weight_decay"] < 0:
        raise ValueError(f"weight_decay must be >= 0 ({where}), got {group['weight_decay']}")
    if "eps" in group and group["eps"] < 0:
        raise ValueError(f"eps must be >= 0 ({where}), got {group['eps']}")
    if "betas" in group:
        b1, b2 = group["betas"]
        for key, beta in (("betas[0]", b1), ("betas[1]", b2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{key} must be in [0, 1) ({where}), got {beta}")


def check_param_types(params: Iterable[torch.Tensor], name_of: Callable[[torch.Tensor], str]) -> None:
    """Refuse complex parameters and dtypes other than float32/bfloat16/float16."""
    for p in params:
        if p.is_complex():
            raise TypeError(f"parameter {name_of(p)} is complex; dist8 optimizers need real tensors")
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"parameter {name_of(p)} has dtype {p.dtype}; supported: float32, bfloat16, float16")
