"""dist8: sharded 8-bit optimizers for PyTorch.

Block-wise dynamic quantization of optimizer state (Dettmers et al., ICLR 2022),
with quantization blocks partitioned across data-parallel ranks.

Every optimizer class of :mod:`dist8.optim` is importable from here, in its three
bitsandbytes names (``AdamW8bit``, ``AdamW32bit`` and ``AdamW``, 32-bit unless
``optim_bits=8``), as is ``GlobalOptimManager``.
"""
from dist8 import checkpoint, nn, optim, quant
from dist8.optim import OPTIMIZERS, GlobalOptimManager, get_optimizer_class
from dist8.optim import (  # noqa: F401 - the public optimizer classes, listed in __all__ from OPTIMIZERS
    LAMB,
    LARS,
    SGD,
    Adagrad,
    Adagrad8bit,
    Adagrad32bit,
    Adam,
    Adam8bit,
    Adam32bit,
    AdamW,
    AdamW8bit,
    AdamW32bit,
    LAMB8bit,
    LAMB32bit,
    LARS8bit,
    LARS32bit,
    Lion,
    Lion8bit,
    Lion32bit,
    RMSprop,
    RMSprop8bit,
    RMSprop32bit,
    SGD8bit,
    SGD32bit,
)
from dist8.integrations import deepspeed_hint
from dist8.shard import ShardedOptimizer

from dist8.version import __version__

deepspeed_hint.arm()  # a DeepSpeed config naming dist8.* without the hook installed: an error saying so

__all__ = [
    *OPTIMIZERS,
    "GlobalOptimManager",
    "ShardedOptimizer",
    "__version__",
    "checkpoint",
    "nn",
    "get_optimizer_class",
    "optim",
    "quant",
]
