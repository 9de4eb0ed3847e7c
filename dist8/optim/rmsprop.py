"""RMSprop and Adagrad with 8-bit (unsigned map) state."""
from __future__ import annotations

from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit"]


class RMSpropFamily(Optimizer8bit):
    """The RMSprop family (shared by :class:`RMSprop8bit`, :class:`RMSprop32bit` and :class:`RMSprop`); not used directly.

RMSprop (``torch.optim.RMSprop`` semantics) with an 8-bit square average.

    ``lr`` 1e-2, ``alpha`` 0.99, ``eps`` 1e-8, ``weight_decay`` 0 (L2). ``momentum``
    and ``centered`` must stay at 0/False (as in bitsandbytes).
    """

    rule = Rule.RMSPROP
    default_bits = 8

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, optim_bits: int | None = None, args: Any = None,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True, **kwargs: Any):
        if momentum != 0:
            raise ValueError(f"momentum={momentum} is not supported by RMSprop8bit (use 0)")
        if centered:
            raise ValueError("centered=True is not supported by RMSprop8bit")
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         **kwargs)

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        if not 0.0 <= hyper["alpha"] < 1.0:
            raise ValueError(f"alpha must be in [0, 1) ({where}), got {hyper['alpha']}")

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        return Scalars(lr=float(hyper["lr"]), beta1=hyper["alpha"], one_minus_beta1=1.0 - hyper["alpha"],
                       eps=hyper["eps"], grad_wd=hyper["weight_decay"], grad_scale=grad_scale), 0


RMSprop8bit, RMSprop32bit, RMSprop = bit_variants(RMSpropFamily, "RMSprop", __name__)


class AdagradFamily(Optimizer8bit):
    """The Adagrad family (shared by :class:`Adagrad8bit`, :class:`Adagrad32bit` and :class:`Adagrad`); not used directly.

Adagrad (``torch.optim.Adagrad`` semantics) with an 8-bit sum of squares.

    ``lr`` 1e-2, ``lr_decay`` 0, ``weight_decay`` 0 (L2), ``eps`` 1e-10;
    ``initial_accumulator_value`` must be 0 (as in bitsandbytes).
    """

    rule = Rule.ADAGRAD
    default_bits = 8

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, optim_bits: int | None = None,
                 args: Any = None, min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True,
                 **kwargs: Any):
        if initial_accumulator_value != 0:
            raise ValueError(f"initial_accumulator_value={initial_accumulator_value} is not supported (use 0)")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         **kwargs)

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        if hyper["lr_decay"] < 0:
            raise ValueError(f"lr_decay must be >= 0 ({where}), got {hyper['lr_decay']}")

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        clr = float(hyper["lr"]) / (1 + (step - 1) * hyper["lr_decay"])
        return Scalars(lr=clr, eps=hyper["eps"], grad_wd=hyper["weight_decay"], grad_scale=grad_scale), 0


Adagrad8bit, Adagrad32bit, Adagrad = bit_variants(AdagradFamily, "Adagrad", __name__)
