"""Settings as plain data that compares by value across ranks (each rank is its own interpreter).

One home for what :mod:`dist8.shard.construction` (ShardedOptimizer's settings, compared once when it
is built) and :mod:`dist8.optim.dtensor` (FSDP2 steps, hashed every step) compare between ranks.
"""
from __future__ import annotations

import enum
import hashlib
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["comparable", "same", "stable_hash"]


def comparable(value: Any, read_device_tensors: bool = True) -> Any:
    """``value`` as plain, picklable data whose equality and repr are the same on every rank with the same
    setting: a tensor (a tensor lr) by its values, numbers as int/float (``1e-3`` and ``0.001``, ``0`` and
    ``0.0``, numpy's and Python's are equal), sequences as tuples, sets as sorted tuples (their order follows
    each interpreter's string-hash seed), mappings as dicts, classes by qualified name, enums by name,
    anything else by repr -- by its type where the repr holds an address.

    ``read_device_tensors=False`` (per step): a tensor off the CPU is described by its device only, since
    reading it would synchronise with the device."""
    if isinstance(value, torch.Tensor):
        if not read_device_tensors and value.device.type != "cpu":
            return f"a {value.device.type} tensor"
        try:
            return comparable(value.detach().cpu().tolist(), read_device_tensors)
        except (RuntimeError, NotImplementedError):  # a meta tensor has no values
            return repr(value)
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): comparable(v, read_device_tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(comparable(v, read_device_tensors) for v in value)
    if isinstance(value, (set, frozenset)):
        return tuple(sorted((comparable(v, read_device_tensors) for v in value), key=repr))
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    text = repr(value)
    # object.__repr__ holds an address, different on every rank: a client's own object in a param group
    # (torch accepts any key there) is compared by its type
    return f"a {type(value).__qualname__}" if " at 0x" in text else text


def same(a: Any, b: Any) -> bool:
    """Equality of two :func:`comparable` values, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def stable_hash(value: Any) -> int:
    """A 63-bit hash of ``repr(value)``, the same in every process (``hash()`` of a str is not): what the
    per-step agreements all-reduce instead of the settings themselves."""
    return int.from_bytes(hashlib.blake2b(repr(value).encode(), digest_size=8).digest(), "little") >> 1
