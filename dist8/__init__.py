"""dist8: sharded 8-bit optimizers for PyTorch.

Block-wise dynamic quantization of optimizer state (Dettmers et al., ICLR 2022),
with quantization blocks partitioned across data-parallel ranks.

The names below are imported on first use (PEP 562), so that ``import dist8`` and the
``dist8`` command's ``--help`` and argument errors do not wait for torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dist8.version import __version__

# name -> the module that defines it
_EXPORTS = {
    **{name: "dist8.optim" for name in ("Adagrad8bit", "Adam8bit", "AdamW8bit", "LAMB8bit", "LARS8bit", "Lion8bit",
                                        "RMSprop8bit", "SGD8bit", "get_optimizer_class")},
    "ShardedOptimizer": "dist8.shard",
    "cast_model": "dist8.nn.cast",
    "GradientRelease": "dist8.optim.release",
    "gradient_release": "dist8.optim.release",
}
_SUBMODULES = ("checkpoint", "nn", "optim", "quant")

__all__ = [
    "Adagrad8bit",
    "Adam8bit",
    "AdamW8bit",
    "GradientRelease",
    "LAMB8bit",
    "LARS8bit",
    "Lion8bit",
    "RMSprop8bit",
    "SGD8bit",
    "ShardedOptimizer",
    "__version__",
    "cast_model",
    "checkpoint",
    "nn",
    "get_optimizer_class",
    "gradient_release",
    "optim",
    "quant",
]


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
    from dist8.optim import (Adagrad8bit, Adam8bit, AdamW8bit, LAMB8bit, LARS8bit, Lion8bit, RMSprop8bit, SGD8bit,
                             get_optimizer_class)
    from dist8.nn.cast import cast_model
    from dist8.optim.release import GradientRelease, gradient_release
    from dist8.shard import ShardedOptimizer
