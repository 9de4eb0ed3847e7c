"""RMSprop and Adagrad with 8-bit (unsigned map) state."""
from __future__ import annotations

from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit"]


@document
class RMSpropFamily(Optimizer8bit):
    """RMSprop (``torch.optim.RMSprop`` semantics) with a block-wise quantized square average: the
    family of :class:`RMSprop8bit`, :class:`RMSprop32bit` and :class:`RMSprop` (not used
    directly). State: the square average (unsigned map), 1.02 bytes per value at 8 bits.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-2.
        alpha (float): decay rate of the square average, in [0, 1). Default 0.99.
        eps (float): added to the root of the square average. Default 1e-8.
        weight_decay (float): L2 penalty added to the gradient. Default 0.
        momentum (float): not supported (as in bitsandbytes); must be 0.
        centered (bool): not supported (as in bitsandbytes); must be False.
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
        # ``momentum`` is a group key (always 0) so that schedulers that look for it
        # (OneCycleLR, CyclicLR) find it, as on torch.optim.RMSprop; step() refuses a non-zero one.
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=0.0),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         **kwargs)

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        if not 0.0 <= hyper["alpha"] < 1.0:
            raise ValueError(f"alpha must be in [0, 1) ({where}), got {hyper['alpha']}")
        _check_no_momentum(hyper.get("momentum", 0.0), where)

    def step(self, closure=None):
        """One step; refuses (before changing anything) a group whose ``momentum`` was set non-zero."""
        for gi, group in enumerate(self.param_groups):
            _check_no_momentum(group.get("momentum", 0.0), f"param group {gi}")
        return super().step(closure)

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        return Scalars.for_rmsprop(lr=float(hyper["lr"]), alpha=hyper["alpha"], eps=hyper["eps"],
                                   weight_decay=hyper["weight_decay"], grad_scale=grad_scale), 0


def _check_no_momentum(momentum: float, where: str) -> None:
    if momentum != 0:
        raise ValueError(
            f"momentum={momentum} ({where}) is not supported by dist8's RMSprop (no momentum buffer); a scheduler "
            "that cycles momentum (OneCycleLR, CyclicLR) needs cycle_momentum=False here; nothing was updated"
        )


RMSprop8bit, RMSprop32bit, RMSprop = bit_variants(RMSpropFamily, "RMSprop", __name__)


@document
class AdagradFamily(Optimizer8bit):
    """Adagrad (``torch.optim.Adagrad`` semantics) with a block-wise quantized sum of squares: the
    family of :class:`Adagrad8bit`, :class:`Adagrad32bit` and :class:`Adagrad` (not used
    directly). State: the sum of squares (unsigned map), 1.02 bytes per value at 8 bits.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-2.
        lr_decay (float): step ``t`` uses ``lr / (1 + (t - 1) * lr_decay)``, >= 0. Default 0.
        weight_decay (float): L2 penalty added to the gradient. Default 0.
        initial_accumulator_value (float): not supported (as in bitsandbytes); must be 0.
        eps (float): added to the root of the sum of squares. Default 1e-10.
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
        return Scalars.for_adagrad(lr=clr, eps=hyper["eps"], weight_decay=hyper["weight_decay"], grad_scale=grad_scale), 0


Adagrad8bit, Adagrad32bit, Adagrad = bit_variants(AdagradFamily, "Adagrad", __name__)
