"""Lion (Chen et al. 2023) with an 8-bit momentum."""
from __future__ import annotations

from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import pair

__all__ = ["Lion", "Lion8bit", "Lion32bit"]


@document
class LionFamily(Optimizer8bit):
    """Lion (Chen et al. 2023) with a block-wise quantized momentum: the family of
    :class:`Lion8bit`, :class:`Lion32bit` and :class:`Lion` (not used directly). State: the
    momentum (signed map), 1.02 bytes per value at 8 bits.

    ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, then ``m = beta2 * m + (1 - beta2) * g``.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-4.
        betas (tuple[float, float]): interpolation (``beta1``) and momentum decay
            (``beta2``), each in [0, 1). Default (0.9, 0.99).
        weight_decay (float): decoupled decay per step, ``p *= 1 - lr * weight_decay``.
            Default 0.
    """

    rule = Rule.LION
    default_bits = 8

    def __init__(self, params, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99), weight_decay: float = 0.0,
                 optim_bits: int | None = None, args: Any = None, min_8bit_size: int = 4096,
                 percentile_clipping: int = 100, block_wise: bool = True, is_paged: bool = False, **kwargs: Any):
        super().__init__(params, dict(lr=lr, betas=pair(betas), weight_decay=weight_decay),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         is_paged=is_paged, **kwargs)

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        beta1, beta2 = hyper["betas"]
        lr = float(hyper["lr"])
        return Scalars.for_lion(lr=lr, beta1=beta1, beta2=beta2, decay=1.0 - lr * hyper["weight_decay"],
                                grad_scale=grad_scale), 0


Lion8bit, Lion32bit, Lion = bit_variants(LionFamily, "Lion", __name__)
