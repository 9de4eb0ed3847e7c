"""Adam and AdamW with 8-bit (or 32-bit) block-wise quantized state."""
from __future__ import annotations

import math
from typing import Any

from dist8.kernels import Rule, Scalars
from dist8.optim.base import Optimizer8bit, bit_variants
from dist8.optim.public_api import document
from dist8.optim.validation import check_flag, pair

__all__ = ["Adam", "Adam8bit", "Adam32bit", "AdamW", "AdamW8bit", "AdamW32bit"]


class _AdamBase(Optimizer8bit):
    rule = Rule.ADAM
    decoupled = False
    default_bits = 8

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        optim_bits: int | None = None,
        args: Any = None,
        min_8bit_size: int = 4096,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        is_paged: bool = False,
        **kwargs: Any,
    ) -> None:
        if check_flag(amsgrad, "amsgrad"):
            raise ValueError("amsgrad=True is not supported by dist8 8-bit Adam")
        super().__init__(
            params,
            dict(lr=lr, betas=pair(betas), eps=eps, weight_decay=weight_decay),
            optim_bits=self.default_bits if optim_bits is None else optim_bits,
            args=args,
            min_8bit_size=min_8bit_size,
            percentile_clipping=percentile_clipping,
            block_wise=block_wise,
            is_paged=is_paged,
            **kwargs,
        )

    def scalars(self, hyper: dict[str, Any], step: int, grad_scale: float) -> tuple[Scalars, int]:
        beta1, beta2 = hyper["betas"]
        lr, wd = float(hyper["lr"]), hyper["weight_decay"]
        bc1 = 1.0 - beta1**step
        bc2 = 1.0 - beta2**step
        return (
            Scalars.for_adam(
                lr=lr / bc1,
                beta1=beta1,
                beta2=beta2,
                eps=hyper["eps"],
                grad_wd=0.0 if self.decoupled else wd,
                decay=1.0 - lr * wd if self.decoupled else 1.0,
                bc1=bc1,
                bc2_sqrt=math.sqrt(bc2),
                grad_scale=grad_scale,
            ),
            0,
        )


def _family_doc(what: str, name: str, weight_decay: str) -> str:
    """The docstring of the Adam and AdamW families, which differ only in their weight decay."""
    return f"""{what} with block-wise quantized state: the family of :class:`{name}8bit`,
    :class:`{name}32bit` and :class:`{name}` (not used directly).

    State: ``m`` (signed map) and ``v`` (unsigned map), 2.03 bytes per value at 8 bits.
    Arguments as ``bitsandbytes.optim.{name}8bit``:

    Args:
        params: an iterable of parameters, of ``(name, parameter)`` pairs
            (``model.named_parameters()``, needed for ``overrides``) or of param-group dicts.
        lr (float): learning rate. Default 1e-3.
        betas (tuple[float, float]): decay rates of ``m`` and ``v``, each in [0, 1).
            Default (0.9, 0.999).
        eps (float): added to ``sqrt(v_hat)`` in the denominator. Default 1e-8.
        weight_decay (float): {weight_decay}
        amsgrad (bool): not supported; must be False.
    """


@document
class AdamFamily(_AdamBase):
    __doc__ = _family_doc("Adam (L2 weight decay added to the gradient)", "Adam",
                          "L2 penalty added to the gradient (``g + wd * p``), as\n"
                          "            ``torch.optim.Adam``. Default 0. bitsandbytes' Adam classes decay decoupled\n"
                          "            instead (their AdamW kernel): code moving from\n"
                          "            ``bnb.optim.Adam8bit(weight_decay=wd)`` keeps its training with\n"
                          "            :class:`AdamW8bit` and the same ``weight_decay``.")


Adam8bit, Adam32bit, Adam = bit_variants(AdamFamily, "Adam", __name__)


@document
class AdamWFamily(_AdamBase):
    __doc__ = _family_doc("AdamW (decoupled weight decay ``p *= 1 - lr * weight_decay``)", "AdamW",
                          "decoupled decay per step, ``p *= 1 - lr * weight_decay``. Default 1e-2.")

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, optim_bits: int | None = None, args: Any = None,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, block_wise: bool = True,
                 is_paged: bool = False, **kwargs: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged, **kwargs)


AdamW8bit, AdamW32bit, AdamW = bit_variants(AdamWFamily, "AdamW", __name__)
