"""RMSprop and Adagrad with 8-bit (unsigned map) state."""
from __future__ import annotations

import numbers
from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import check_flag

__all__ = ["RMSprop", "RMSprop8bit", "RMSprop32bit", "Adagrad", "Adagrad8bit", "Adagrad32bit"]


@document
class RMSpropFamily(Optimizer8bit):
    """RMSprop (``torch.optim.RMSprop`` semantics) with a block-wise quantized square average: the
    family of :class:`RMSprop8bit`, :class:`RMSprop32bit` and :class:`RMSprop` (not used
    directly). State: the square average (unsigned map), 1.02 bytes per value at 8 bits; with
    momentum also torch's momentum buffer (signed map), 2.03 bytes.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-2.
        alpha (float): decay rate of the square average, in [0, 1). Default 0.99.
        eps (float): added to the root of the square average. Default 1e-8.
        weight_decay (float): L2 penalty added to the gradient. Default 0.
        momentum (float): torch's RMSprop momentum, in [0, 1): ``buf = momentum * buf +
            g / (sqrt(v) + eps)``, ``p -= lr * buf``. A value > 0 at construction gives the
            optimizer a momentum buffer (rule ``RMSPROP_MOMENTUM``), whose momentum schedulers
            may then change (OneCycleLR / CyclicLR with ``cycle_momentum=True``); with 0 at
            construction there is no buffer and a non-zero momentum set later is refused at
            ``step``. Default 0.
        centered (bool): not supported (as in bitsandbytes); must be False.
    """

    rule = Rule.RMSPROP  # per instance: RMSPROP_MOMENTUM when constructed with momentum > 0
    default_bits = 8

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
                 momentum: float = 0.0, centered: bool = False, optim_bits: int | None = None, args: Any = None,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True, **kwargs: Any):
        if check_flag(centered, "centered"):
            raise ValueError("centered=True is not supported by RMSprop8bit")
        # The rule (and with it the state: a momentum buffer or not) is fixed at construction;
        # a bad momentum (NaN, negative, >= 1) is refused by the shared checks below, naming it.
        if isinstance(momentum, numbers.Real) and not isinstance(momentum, bool) and momentum > 0:
            self.rule = Rule.RMSPROP_MOMENTUM
        # ``momentum`` is a group key so that schedulers that look for it (OneCycleLR, CyclicLR)
        # find it, as on torch.optim.RMSprop.
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         **kwargs)

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        if not 0.0 <= hyper["alpha"] < 1.0:
            raise ValueError(f"alpha must be in [0, 1) ({where}), got {hyper['alpha']}")
        if self.rule == Rule.RMSPROP:
            _check_no_momentum(hyper.get("momentum", 0.0), where)

    def step(self, closure=None):
        """One step; without a momentum buffer, refuses (before changing anything) a group whose
        ``momentum`` was set non-zero."""
        if self.rule == Rule.RMSPROP:
            for gi, group in enumerate(self.param_groups):
                _check_no_momentum(group.get("momentum", 0.0), f"param group {gi}")
        return super().step(closure)

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        return Scalars.for_rmsprop(lr=float(hyper["lr"]), alpha=hyper["alpha"], eps=hyper["eps"],
                                   weight_decay=hyper["weight_decay"], momentum=float(hyper.get("momentum", 0.0)),
                                   grad_scale=grad_scale), 0


def _check_no_momentum(momentum: float, where: str) -> None:
    if momentum != 0:
        raise ValueError(
            f"momentum={momentum} ({where}): this RMSprop was constructed with momentum=0 and keeps no momentum "
            "buffer; construct it with the momentum > 0 you start from (a scheduler that cycles momentum, "
            "OneCycleLR or CyclicLR, then may change it), or use cycle_momentum=False; nothing was updated"
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
