"""Optimizer cases shared by the tests: dist8 class, its kwargs and the torch counterpart."""
from typing import Any, NamedTuple

import torch

import dist8.optim as O


class OptimCase(NamedTuple):
    """A dist8 optimizer with its kwargs, and the torch optimizer it matches (None where torch has none)."""

    cls: type
    kwargs: dict[str, Any]
    torch_cls: type | None
    torch_kwargs: dict[str, Any] | None


_RAW = {
    "Adam": (O.Adam8bit, dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01), torch.optim.Adam,
             dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)),
    "AdamW": (O.AdamW8bit, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1), torch.optim.AdamW,
              dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "SGD": (O.SGD8bit, dict(lr=1e-2, momentum=0.9, weight_decay=1e-3), torch.optim.SGD,
            dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    "SGD-nesterov": (O.SGD8bit, dict(lr=1e-2, momentum=0.9, nesterov=True), torch.optim.SGD,
                     dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "RMSprop": (O.RMSprop8bit, dict(lr=1e-3, alpha=0.9, weight_decay=1e-3), torch.optim.RMSprop,
                dict(lr=1e-3, alpha=0.9, weight_decay=1e-3)),
    "RMSprop-momentum": (O.RMSprop8bit, dict(lr=1e-3, alpha=0.9, momentum=0.9, weight_decay=1e-3), torch.optim.RMSprop,
                         dict(lr=1e-3, alpha=0.9, momentum=0.9, weight_decay=1e-3)),
    "Adagrad": (O.Adagrad8bit, dict(lr=1e-2, lr_decay=1e-3), torch.optim.Adagrad, dict(lr=1e-2, lr_decay=1e-3)),
    "Lion": (O.Lion8bit, dict(lr=1e-3, weight_decay=0.1), None, None),
    "LAMB": (O.LAMB8bit, dict(lr=1e-2, weight_decay=0.01), None, None),
    "LARS": (O.LARS8bit, dict(lr=1e-1, momentum=0.9, weight_decay=1e-4), None, None),
    "AdEMAMix": (O.AdEMAMix8bit, dict(lr=1e-2, t_alpha=5, t_beta3=5, weight_decay=0.01), None, None),
}

CASES: dict[str, OptimCase] = {name: OptimCase(*case) for name, case in _RAW.items()}
