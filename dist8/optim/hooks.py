"""torch.optim.Optimizer's state-dict hooks, for optimizers whose state_dict/load_state_dict are their own.

``torch.optim.Optimizer.state_dict``/``load_state_dict`` run the hooks registered with
``register_state_dict_pre_hook``/``post_hook`` and
``register_load_state_dict_pre_hook``/``post_hook``; an optimizer that replaces those
methods (dist8's plain and sharded optimizers store and validate their own format)
runs them through these two functions, in torch's order and with torch's contract:
a pre hook may return a replacement state dict, a post hook of ``state_dict`` may
return a replacement, and the caller's dict is never modified (shallow copy first).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["state_dict_with_hooks", "load_state_dict_with_hooks"]


def _hooks(opt: torch.optim.Optimizer, kind: str) -> list:
    # torch keeps the registered hooks in these OrderedDicts (created by Optimizer.__init__/__setstate__)
    return list(getattr(opt, f"_optimizer_{kind}_hooks", {}).values())


def state_dict_with_hooks(opt: torch.optim.Optimizer, make: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make()`` framed by the optimizer's state-dict pre hooks (``hook(opt)``) and post hooks
    (``hook(opt, state_dict)`` returning a replacement or None)."""
    for hook in _hooks(opt, "state_dict_pre"):
        hook(opt)
    state_dict = make()
    for hook in _hooks(opt, "state_dict_post"):
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    return state_dict


def load_state_dict_with_hooks(
    opt: torch.optim.Optimizer, state_dict: dict[str, Any], load: Callable[[dict[str, Any]], None]
) -> None:
    """``load(state_dict)`` framed by the load pre hooks (``hook(opt, state_dict)`` returning a
    replacement or None) and post hooks (``hook(opt)``, run only after a successful load)."""
    if isinstance(state_dict, dict):
        state_dict = state_dict.copy()  # hooks may add or drop keys: never in the caller's dict
    for hook in _hooks(opt, "load_state_dict_pre"):
        result = hook(opt, state_dict)
        if result is not None:
            state_dict = result
    load(state_dict)
    for hook in _hooks(opt, "load_state_dict_post"):
        hook(opt)
