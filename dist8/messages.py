"""How error messages show a value: on one line, at bounded length.

Every layer's errors name the key and show what they got; a tensor's repr spans many lines and a
hostile checkpoint's value can be arbitrarily long, so messages show values through :func:`brief`.
Imports nothing of dist8, so every layer may use it.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["brief"]


def brief(value: Any, limit: int = 60) -> str:
    """``value`` for an error message, on one line: a tensor of more than one element by its shape and
    dtype, anything else by its repr with whitespace runs collapsed, cut to ``limit`` characters."""
    if isinstance(value, torch.Tensor) and value.numel() != 1:
        return f"a tensor of shape {tuple(value.shape)} ({str(value.dtype).removeprefix('torch.')})"
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
