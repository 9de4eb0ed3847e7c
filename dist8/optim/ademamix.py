"""AdEMAMix (Pagliardini et al. 2024) with 8-bit (or 32-bit) block-wise quantized state."""
from __future__ import annotations

import math
import numbers
from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import pair

__all__ = ["AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit", "alpha_at", "beta3_at"]


def alpha_at(alpha: float, t_alpha: int | None, step: int) -> float:
    """The slow-EMA weight of step ``step`` (from 1): ``min(step * alpha / t_alpha, alpha)``, a linear
    warm-up over ``t_alpha`` steps; ``alpha`` itself when ``t_alpha`` is None or 0 (as bitsandbytes)."""
    if not t_alpha:
        return float(alpha)
    return min(step * float(alpha) / t_alpha, float(alpha))


def beta3_at(beta1: float, beta3: float, t_beta3: int | None, step: int) -> float:
    """The slow EMA's decay of step ``step`` (from 1): the paper's warm-up from ``beta1`` to ``beta3``
    over ``t_beta3`` steps, ``min(exp(ln b1 * ln b3 / ((1 - s) ln b3 + s ln b1)), b3)`` with
    ``s = step / t_beta3`` (its half-life grows linearly); ``beta3`` when ``t_beta3`` is None or 0."""
    if not t_beta3:
        return float(beta3)
    ln1, ln3 = math.log(beta1), math.log(beta3)
    s = step / t_beta3
    return min(math.exp((ln1 * ln3) / ((1 - s) * ln3 + s * ln1)), float(beta3))


def _check_steps(value: Any, key: str, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{key} must be None or an integer >= 0 (steps; 0 or None: no warm-up) ({where}), "
                         f"got {value!r}")


@document
class AdEMAMixFamily(Optimizer8bit):
    """AdEMAMix (Pagliardini et al. 2024, "The AdEMAMix Optimizer": a mixture of a fast and a slow
    EMA of the gradient) with block-wise quantized state: the family of :class:`AdEMAMix8bit`,
    :class:`AdEMAMix32bit` and :class:`AdEMAMix` (not used directly). As ``bitsandbytes.optim.AdEMAMix``::

        m1 = b1 m1 + (1 - b1) g        (fast EMA, bias-corrected)
        m2 = b3 m2 + (1 - b3) g        (slow EMA, no bias correction)
        nu = b2 nu + (1 - b2) g^2
        p  = p (1 - lr wd) - lr (m1 / (1 - b1^t) + alpha m2) / (sqrt(nu) / sqrt(1 - b2^t) + eps)

    with ``alpha`` and ``b3`` warmed up per step (:func:`alpha_at`, :func:`beta3_at`). State:
    ``m1`` and ``m2`` (signed map) and ``nu`` (unsigned map), 3.05 bytes per value at 8 bits
    (32-bit: 12).

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate, >= 0. Default 1e-3.
        betas (tuple[float, float, float]): decay rates of ``m1``, ``nu`` and ``m2`` (the
            slow EMA), each in [0, 1). Default (0.9, 0.999, 0.9999).
        alpha (float): weight of the slow EMA in the update, >= 0. Default 5.0.
        t_alpha (int | None): steps of the linear warm-up of ``alpha`` from 0; None or 0: none.
            Default None.
        t_beta3 (int | None): steps of the warm-up of ``b3`` from ``b1`` (needs ``b1, b3 > 0``);
            None or 0: none. Default None.
        eps (float): added to ``sqrt(nu_hat)`` in the denominator, >= 0. Default 1e-8.
        weight_decay (float): decoupled decay per step, ``p *= 1 - lr * weight_decay``, >= 0.
            Default 1e-2.
    """

    rule = Rule.ADEMAMIX
    n_betas = 3
    default_bits = 8

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 alpha: float = 5.0, t_alpha: int | None = None, t_beta3: int | None = None, eps: float = 1e-8,
                 weight_decay: float = 1e-2, optim_bits: int | None = None, min_8bit_size: int = 4096,
                 is_paged: bool = False, percentile_clipping: int = 100, block_wise: bool = True,
                 args: Any = None, **kwargs: Any) -> None:
        super().__init__(
            params,
            dict(lr=lr, betas=pair(betas), alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, eps=eps,
                 weight_decay=weight_decay),
            optim_bits=self.default_bits if optim_bits is None else optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            **kwargs,
        )

    def check_hyper(self, hyper: dict[str, Any], where: str) -> None:
        _check_steps(hyper.get("t_alpha"), "t_alpha", where)
        _check_steps(hyper.get("t_beta3"), "t_beta3", where)
        beta1, _, beta3 = hyper["betas"]
        if hyper.get("t_beta3") and (beta1 <= 0 or beta3 <= 0):
            raise ValueError(f"betas[0] and betas[2] must be > 0 with t_beta3 (its warm-up takes their logarithms) "
                             f"({where}), got {hyper['betas']!r}")

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        beta1, beta2, beta3 = (float(b) for b in hyper["betas"])
        lr, wd = float(hyper["lr"]), float(hyper["weight_decay"])
        beta3_t = beta3_at(beta1, beta3, hyper["t_beta3"], step)
        return (
            Scalars.for_ademamix(
                lr=lr, beta1=beta1, beta2=beta2, beta3=beta3_t, alpha=alpha_at(hyper["alpha"], hyper["t_alpha"], step),
                eps=float(hyper["eps"]), bc1=1.0 - beta1**step, bc2_sqrt=math.sqrt(1.0 - beta2**step),
                decay=1.0 - lr * wd, grad_scale=grad_scale,
            ),
            0,
        )


AdEMAMix8bit, AdEMAMix32bit, AdEMAMix = bit_variants(AdEMAMixFamily, "AdEMAMix", __name__)
