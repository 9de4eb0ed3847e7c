"""dist8: sharded 8-bit optimizers for PyTorch.

Block-wise dynamic quantization of optimizer state (Dettmers et al., ICLR 2022),
with quantization blocks partitioned across data-parallel ranks.

Every optimizer class of :mod:`dist8.optim` is importable from here, in its three
bitsandbytes names (``AdamW8bit``, ``AdamW32bit`` and ``AdamW``, 32-bit unless
``optim_bits=8``), as is ``GlobalOptimManager``.

The names below are imported on first use (PEP 562), so that ``import dist8`` and the
``dist8`` command's ``--help`` and argument errors do not wait for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dist8.integrations import deepspeed_hint
from dist8.version import __version__

FAMILIES = ("Adam", "AdamW", "SGD", "LARS", "RMSprop", "Adagrad", "LAMB", "Lion", "AdEMAMix")
OPTIMIZER_NAMES = tuple(f"{family}{bits}" for family in FAMILIES for bits in ("", "8bit", "32bit"))
# bitsandbytes' paged classes (dist8.optim.paged): importable, and calling one says what to use instead
PAGED_NAMES = tuple(f"Paged{family}{bits}" for family in ("Adam", "AdamW", "Lion", "AdEMAMix")
                    for bits in ("", "8bit", "32bit"))

# name -> the module that defines it
_EXPORTS = {
    **{name: "dist8.optim" for name in (*OPTIMIZER_NAMES, *PAGED_NAMES, "OPTIMIZERS", "GlobalOptimManager",
                                        "get_optimizer_class")},
    "ShardedOptimizer": "dist8.shard",
    "cast_model": "dist8.nn.cast",
    "GradientRelease": "dist8.optim.release",
    "gradient_release": "dist8.optim.release",
}
_SUBMODULES = ("checkpoint", "nn", "optim", "quant")

__all__ = [
    *OPTIMIZER_NAMES,
    "GlobalOptimManager",
    "GradientRelease",
    "ShardedOptimizer",
    "__version__",
    "cast_model",
    "checkpoint",
    "get_optimizer_class",
    "gradient_release",
    "nn",
    "optim",
    "quant",
]

deepspeed_hint.arm()  # a DeepSpeed config naming dist8.* without the hook installed: an error saying so


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"dist8.{name}")
    else:
        raise AttributeError(f"module 'dist8' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports these names stand for
    from dist8 import checkpoint, nn, optim, quant
    from dist8.nn.cast import cast_model
    from dist8.optim import (LAMB, LARS, OPTIMIZERS, SGD,  # noqa: F401 (listed via OPTIMIZER_NAMES) Adagrad, Adagrad8bit, Adagrad32bit, Adam, Adam8bit, Adam32bit,
                             AdamW, AdamW8bit, AdamW32bit, GlobalOptimManager, LAMB8bit, LAMB32bit, LARS8bit, LARS32bit,
                             Lion, Lion8bit, Lion32bit, RMSprop, RMSprop8bit, RMSprop32bit, SGD8bit, SGD32bit,
                             get_optimizer_class)
    from dist8.optim import AdEMAMix, AdEMAMix8bit, AdEMAMix32bit  # noqa: F401 (listed via OPTIMIZER_NAMES)
    from dist8.optim.release import GradientRelease, gradient_release
    from dist8.shard import ShardedOptimizer
