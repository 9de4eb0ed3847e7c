"""SGD with momentum and LARS (layer-wise trust ratio) with 8-bit state."""
from __future__ import annotations

from typing import Any

from dist8.kernels import FLAG_FIRST_STEP, FLAG_NESTEROV, Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import check_flag

__all__ = ["SGD", "SGD8bit", "SGD32bit", "LARS", "LARS8bit", "LARS32bit"]


class _MomentumBase(Optimizer8bit):
    default_bits = 8

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        optim_bits: int | None = None,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                 nesterov=check_flag(nesterov, "nesterov")),
            optim_bits=self.default_bits if optim_bits is None else optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            **kwargs,
        )

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        if not 0.0 < hyper["momentum"] < 1.0:
            raise ValueError(
                f"momentum must be in (0, 1) ({where}), got {hyper['momentum']}; "
                "for plain SGD without state use torch.optim.SGD"
            )
        if not 0.0 <= hyper["dampening"] < 1.0:
            raise ValueError(f"dampening must be in [0, 1) ({where}), got {hyper['dampening']}")
        if hyper["nesterov"] and hyper["dampening"] != 0:
            raise ValueError(f"nesterov=True requires dampening=0 ({where})")

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        flags = (FLAG_FIRST_STEP if step == 1 else 0) | (FLAG_NESTEROV if hyper["nesterov"] else 0)
        return (
            Scalars.for_momentum(
                lr=float(hyper["lr"]),
                momentum=hyper["momentum"],
                dampening=hyper["dampening"],
                weight_decay=hyper["weight_decay"],
                grad_scale=grad_scale,
            ),
            flags,
        )


@document
class SGDFamily(_MomentumBase):
    """SGD with momentum (``torch.optim.SGD`` semantics, optional Nesterov) and a block-wise quantized
    momentum buffer: the family of :class:`SGD8bit`, :class:`SGD32bit` and :class:`SGD` (not used
    directly). State: the momentum (signed map), 1.02 bytes per value at 8 bits.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-3 (torch's; bitsandbytes requires one).
        momentum (float): momentum factor, in (0, 1); required in practice (the default 0
            is refused: without momentum there is no state to quantize; use torch.optim.SGD).
        dampening (float): the gradient enters the buffer times ``1 - dampening``, in [0, 1).
            Default 0.
        weight_decay (float): L2 penalty added to the gradient. Default 0.
        nesterov (bool): Nesterov momentum (needs ``dampening=0``). Default False.
    """

    rule = Rule.SGD


SGD8bit, SGD32bit, SGD = bit_variants(SGDFamily, "SGD", __name__)


@document
class LARSFamily(_MomentumBase):
    """LARS: momentum SGD whose step is scaled per parameter by ``trust_coefficient * |p| / |u|``,
    with a block-wise quantized momentum buffer: the family of :class:`LARS8bit`,
    :class:`LARS32bit` and :class:`LARS` (not used directly). State: the momentum, 1.02 bytes
    per value at 8 bits.

    ``u`` is the momentum direction (weight decay included); the ratio is 1 where either norm
    is 0; norms cover the whole parameter, also when it is sharded.

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate; required.
        momentum (float): momentum factor, in (0, 1); required in practice (0 is refused).
        dampening (float): the gradient enters the buffer times ``1 - dampening``, in [0, 1).
            Default 0.
        weight_decay (float): L2 penalty added to the gradient. Default 0.
        nesterov (bool): Nesterov momentum (needs ``dampening=0``). Default False.
        max_unorm (float): the trust coefficient (bitsandbytes' name), > 0. Default 0.02.
    """

    rule = Rule.LARS

    def __init__(self, params, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, optim_bits: int | None = None, args: Any = None, min_8bit_size: int = 4096,
                 percentile_clipping: int = 100, max_unorm: float = 0.02, **kwargs: Any) -> None:
        if not max_unorm > 0:
            raise ValueError(f"max_unorm (the LARS trust coefficient) must be > 0, got {max_unorm}; for "
                             "bitsandbytes' max_unorm=0 (no clipping: plain momentum SGD) use SGD8bit")
        self.trust_coefficient = float(max_unorm)
        super().__init__(params, lr, momentum, dampening, weight_decay, nesterov, optim_bits, args, min_8bit_size,
                         percentile_clipping, max_unorm=max_unorm, **kwargs)

    def trust_ratio(self, hyper: dict[str, Any], p_norm: float, u_norm: float) -> float:
        if p_norm == 0 or u_norm == 0:
            return 1.0
        return self.trust_coefficient * p_norm / u_norm


LARS8bit, LARS32bit, LARS = bit_variants(LARSFamily, "LARS", __name__)
