"""Translation of a DeepSpeed config's ``optimizer`` section into a dist8 optimizer's keyword arguments."""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from dist8.messages import brief
from dist8.optim import get_optimizer_class
from dist8.optim.base import Optimizer8bit

__all__ = ["PREFIX", "is_dist8_type", "valid_keys", "optimizer_kwargs", "load_config", "check_config", "resolve_auto"]

PREFIX = "dist8."
_NOT_KWARGS = {"self", "params", "defaults", "args", "a", "kw", "kwargs", "is_paged"}


def is_dist8_type(name: Any) -> bool:
    """True for an optimizer ``type`` naming a dist8 optimizer (``"dist8.AdamW8bit"``, case-insensitive)."""
    return isinstance(name, str) and name.lower().startswith(PREFIX)


def valid_keys(cls: type[Optimizer8bit]) -> list[str]:
    """Keyword arguments ``cls`` accepts (its own and :class:`Optimizer8bit`'s)."""
    keys: list[str] = []
    for klass in cls.__mro__:
        if klass is torch.optim.Optimizer or "__init__" not in vars(klass):
            continue
        for name, prm in inspect.signature(vars(klass)["__init__"]).parameters.items():
            if name in _NOT_KWARGS or prm.kind in (prm.VAR_POSITIONAL, prm.VAR_KEYWORD) or name in keys:
                continue
            keys.append(name)
        if klass is Optimizer8bit:
            break
    return keys


def optimizer_kwargs(cls: type[Optimizer8bit], params: dict[str, Any] | None) -> dict[str, Any]:
    """Turn a DeepSpeed ``optimizer.params`` dict into keyword arguments for ``cls``.

    ``"auto"`` (left by HF Trainer) and ``None`` mean "use dist8's default"; ``betas`` lists
    become tuples; an unknown key raises ``ValueError`` naming it and listing the valid ones.
    """
    valid = valid_keys(cls)
    out: dict[str, Any] = {}
    if params is not None and not isinstance(params, dict):
        raise ValueError(f"DeepSpeed config optimizer.params must be a dict of keyword arguments for "
                         f"dist8.{cls.__name__}, got {brief(params)}")
    for key, value in (params or {}).items():
        if key not in valid:
            hint = ""
            if key == "max_grad_norm":
                hint = " (use DeepSpeed's top-level 'gradient_clipping')"
            raise ValueError(f"DeepSpeed config optimizer.params has unknown key {key!r} for dist8.{cls.__name__}"
                             f"{hint}; valid keys: {', '.join(valid)}")
        if value is None or (isinstance(value, str) and value.lower() == "auto"):
            continue
        if key == "betas":
            if not isinstance(value, (list, tuple)) or not all(_is_number(b) for b in value):
                raise ValueError(f"DeepSpeed config optimizer.params.betas must be a list of numbers, got {brief(value)}")
            value = tuple(float(b) for b in value)
        elif key in ("lr", "eps", "weight_decay") and isinstance(value, (int, float, str)):
            if not _is_number(value):
                huge = " within float's range" if isinstance(value, int) else ""  # JSON allows any digits
                raise ValueError(f"DeepSpeed config optimizer.params.{key} must be a number{huge}, got {brief(value)}")
            value = float(value)
        out[key] = value
    return out


def _is_number(value: Any) -> bool:
    """An int or float (not a bool), or a string that float() reads ("3e-4", as JSON writers leave it); an
    int beyond float's range (JSON allows any digits) is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        float(value)
    except (ValueError, OverflowError):
        return False
    return True


def load_config(config) -> dict:
    """A DeepSpeed config given as a path to a JSON file, a dict or None, as a new dict.

    A file that cannot be read or is not a JSON object raises ValueError naming the file."""
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config) as f:
                loaded = json.load(f)
        except OSError as exc:
            raise ValueError(f"DeepSpeed config {os.fspath(config)}: cannot read it ({exc.strerror})") from None
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"DeepSpeed config {os.fspath(config)} is not valid JSON: {str(exc)[:100]}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"DeepSpeed config {os.fspath(config)} must hold a JSON object, got {type(loaded).__name__}")
        return loaded
    if not isinstance(config, Mapping):
        raise ValueError(f"DeepSpeed config must be a dict or a path to a JSON file, got {brief(config)}")
    return dict(config)


def check_config(config: dict) -> None:
    """Raise early (ValueError naming the key) on a bad ``dist8.*`` optimizer section."""
    opt = config.get("optimizer")
    if not isinstance(opt, dict):  # absent, or not ours to judge (DeepSpeed reports its own)
        return
    if is_dist8_type(opt.get("type")):
        cls = get_optimizer_class(opt["type"])
        optimizer_kwargs(cls, opt.get("params"))  # raise early on unknown keys


def resolve_auto(config: dict) -> dict:
    """Copy of ``config`` with HF-Trainer-style ``"auto"`` values removed (top level) or off (``enabled``)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, str) and value.lower() == "auto":
            continue
        if isinstance(value, dict):
            value = {k: (False if k == "enabled" and isinstance(v, str) and v.lower() == "auto" else v)
                     for k, v in value.items()}
        out[key] = value
    return out
