"""dist8: sharded 8-bit optimizers for PyTorch.

Block-wise dynamic quantization of optimizer state (Dettmers et al., ICLR 2022),
with quantization blocks partitioned across data-parallel ranks.
"""
from dist8 import checkpoint, nn, optim, quant
from dist8.shard import ShardedOptimizer
from dist8.optim import (
    LAMB8bit,
    LARS8bit,
    SGD8bit,
    Adagrad8bit,
    Adam8bit,
    AdamW8bit,
    Lion8bit,
    RMSprop8bit,
    get_optimizer_class,
)

from dist8.version import __version__

__all__ = [
    "Adagrad8bit",
    "Adam8bit",
    "AdamW8bit",
    "LAMB8bit",
    "LARS8bit",
    "Lion8bit",
    "RMSprop8bit",
    "SGD8bit",
    "ShardedOptimizer",
    "__version__",
    "checkpoint",
    "nn",
    "get_optimizer_class",
    "optim",
    "quant",
]
