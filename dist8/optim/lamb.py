"""LAMB (You et al. 2020): Adam direction scaled per parameter by |p| / |u|."""
from __future__ import annotations

import math
from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import check_flag, pair

__all__ = ["LAMB", "LAMB8bit", "LAMB32bit"]


@document
class LAMBFamily(Optimizer8bit):
    """LAMB (You et al. 2020) with block-wise quantized state: the family of :class:`LAMB8bit`,
    :class:`LAMB32bit` and :class:`LAMB` (not used directly). State: ``m`` and ``v``, 2.03 bytes
    per value at 8 bits.

    ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p`` (``adam_w_mode=True``; with False
    the decay is added to the gradient instead), then ``p -= lr * (|p| / |u|) * u`` with the
    ratio 1 where either norm is 0. Norms are over the whole parameter, also when it is
    sharded. Arguments follow ``bitsandbytes.optim.LAMB8bit``:

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-3.
        bias_correction (bool): divide ``m`` and ``v`` by ``1 - beta^t``. Default True.
        betas (tuple[float, float]): decay rates of ``m`` and ``v``, each in [0, 1).
            Default (0.9, 0.999).
        eps (float): added to ``sqrt(v_hat)``. Default 1e-8.
        weight_decay (float): decay added to the update (``adam_w_mode``) or to the gradient.
            Default 0.
        amsgrad (bool): not supported; must be False.
        adam_w_mode (bool): decay in the update (True) or in the gradient (False). Default True.
        max_unorm (float): clips the applied update as bitsandbytes does, on top of the trust
            ratio: where ``|ratio * u| > max_unorm * |p|`` the ratio becomes
            ``max_unorm * |p| / |u|`` (never binding at 1.0 or above; not applied where
            ``|p| = 0``). 0 turns it off. Default 1.0.
    """

    rule = Rule.LAMB
    default_bits = 8

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, adam_w_mode: bool = True,
                 optim_bits: int | None = None, args: Any = None, min_8bit_size: int = 4096,
                 percentile_clipping: int = 100, block_wise: bool = True, max_unorm: float = 1.0, **kwargs: Any):
        if check_flag(amsgrad, "amsgrad"):
            raise ValueError("amsgrad=True is not supported by LAMB8bit")
        super().__init__(params, dict(lr=lr, betas=pair(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=check_flag(bias_correction, "bias_correction"),
                                      adam_w_mode=check_flag(adam_w_mode, "adam_w_mode"),
                                      max_unorm=max_unorm),
                         optim_bits=self.default_bits if optim_bits is None else optim_bits, args=args,
                         min_8bit_size=min_8bit_size, percentile_clipping=percentile_clipping, block_wise=block_wise,
                         **kwargs)

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        beta1, beta2 = hyper["betas"]
        bc1 = 1.0 - beta1**step if hyper["bias_correction"] else 1.0
        bc2 = 1.0 - beta2**step if hyper["bias_correction"] else 1.0
        wd = hyper["weight_decay"]
        return Scalars.for_adam(lr=float(hyper["lr"]), beta1=beta1, beta2=beta2, eps=hyper["eps"],
                                grad_wd=0.0 if hyper["adam_w_mode"] else wd, bc1=bc1, bc2_sqrt=math.sqrt(bc2),
                                grad_scale=grad_scale, update_wd=wd if hyper["adam_w_mode"] else 0.0), 0

    def trust_ratio(self, hyper: dict[str, Any], p_norm: float, u_norm: float) -> float:
        if p_norm == 0 or u_norm == 0:
            return 1.0
        ratio = p_norm / u_norm
        max_unorm = float(hyper.get("max_unorm", 0.0))
        if max_unorm > 0 and ratio * u_norm > max_unorm * p_norm:
            ratio = max_unorm * p_norm / u_norm
        return ratio


LAMB8bit, LAMB32bit, LAMB = bit_variants(LAMBFamily, "LAMB", __name__)
