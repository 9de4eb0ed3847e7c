"""Reference backend: the rules of :mod:`dist8.kernels.rules` run with plain torch ops.

Slow and memory-hungry (it dequantizes a whole tensor), but it is the ground
truth every other backend is tested against.
"""
from __future__ import annotations

import torch

from dist8.kernels.rules import Rule, Scalars, apply_rule
from dist8.quant import dequantize_blockwise, quantize_blockwise


def _load_state(state: torch.Tensor | None, absmax: torch.Tensor | None, qmap, block_size: int):
    if state is None:
        return None
    if absmax is None:
        return state.reshape(-1).float()
    return dequantize_blockwise(state.reshape(-1), absmax, qmap, block_size)


def _store_state(new: torch.Tensor, state: torch.Tensor, absmax: torch.Tensor | None, qmap, block_size: int) -> None:
    if absmax is None:
        state.copy_(new.view(state.shape))
        return
    codes, new_absmax = quantize_blockwise(new, qmap, block_size)
    state.copy_(codes.view(state.shape))
    absmax.copy_(new_absmax)


class ReferenceBackend:
    """Runs :func:`dist8.kernels.rules.apply_rule` on whole tensors."""

    name = "reference"

    def fused_update(
        self,
        rule: Rule,
        param: torch.Tensor,
        grad: torch.Tensor,
        state1: torch.Tensor,
        state2: torch.Tensor | None,
        absmax1: torch.Tensor | None,
        absmax2: torch.Tensor | None,
        qmap1: torch.Tensor | None,
        qmap2: torch.Tensor | None,
        scalars: Scalars,
        flags: int,
        block_size: int,
        update_out: torch.Tensor | None = None,
    ) -> None:
        """Update ``param`` (or write ``update_out``) and the states in place.

        ``state*`` are uint8 codes with float32 ``absmax*`` (8-bit) or float32
        tensors with ``absmax* = None`` (32-bit); all tensors hold the same
        number of elements in the same (flattened) order.
        """
        p = param.detach().reshape(-1).float()
        g = grad.detach().reshape(-1).float()
        s1 = _load_state(state1, absmax1, qmap1, block_size)
        s2 = _load_state(state2, absmax2, qmap2, block_size)
        out, s1_new, s2_new = apply_rule(Rule(rule), p, g, s1, s2, scalars, flags)
        _store_state(s1_new, state1, absmax1, qmap1, block_size)
        if s2_new is not None:
            _store_state(s2_new, state2, absmax2, qmap2, block_size)
        target = update_out if update_out is not None else param
        target.detach().copy_(out.view(target.shape))

    def fused_update_multi(self, rule: Rule, updates: list[tuple], qmap1, qmap2, scalars: Scalars, flags: int,
                           block_size: int) -> None:
        """:meth:`fused_update` for each ``(param, grad, state1, state2, absmax1, absmax2)`` of ``updates``."""
        for p, g, s1, s2, a1, a2 in updates:
            self.fused_update(rule, p, g, s1, s2, a1, a2, qmap1, qmap2, scalars, flags, block_size)

    def all_finite(self, grad: torch.Tensor) -> bool:
        """True when every element of ``grad`` is finite."""
        return bool(torch.isfinite(grad).all())

    def all_finite_many(self, grads: list[torch.Tensor]) -> list[bool]:
        """:meth:`all_finite` of each tensor."""
        return [self.all_finite(g) for g in grads]
