"""Reference backend: the rules of :mod:`dist8.kernels.rules` run with plain torch ops.

Slow and memory-hungry (it dequantizes a whole tensor), but it is the ground
truth every other backend is tested against.
"""
from __future__ import annotations

import torch

from dist8.kernels.rules import (RULE_STATES, Rule, Scalars, apply_rule_states, finite_blocks, read_state,
                                 state_floored, trust_step)
from dist8.quant import quantize_blockwise
from dist8.quant.master import decode_master, encode_master


def _load_state(state: torch.Tensor | None, absmax: torch.Tensor | None, qmap, block_size: int, floored: bool):
    if state is None:
        return None
    if absmax is None:
        return state.reshape(-1).float()
    return read_state(state, absmax, qmap, block_size, floored)


def _store_state(new: torch.Tensor, state: torch.Tensor, absmax: torch.Tensor | None, qmap, block_size: int,
                 keep: torch.Tensor | None) -> None:
    """Write the new state; ``keep`` (bool per value, or None) marks values of skipped blocks."""
    flat = state.view(-1)
    if absmax is None:
        new = new.view(-1)
        flat.copy_(new if keep is None else torch.where(keep, flat, new))
        return
    codes, new_absmax = quantize_blockwise(new, qmap, block_size)
    if keep is None:
        flat.copy_(codes.view(-1))
        absmax.copy_(new_absmax)
        return
    flat.copy_(torch.where(keep, flat, codes.view(-1)))
    keep_block = keep[::block_size]
    absmax.copy_(torch.where(keep_block, absmax, new_absmax))


def check_correction(param: torch.Tensor, correction: torch.Tensor) -> None:
    """ValueError unless ``correction`` fits ``param``: int8/int16, same element count, and a bf16/fp16 ``param``."""
    if correction.dtype not in (torch.int8, torch.int16):
        raise ValueError(f"correction must be int8 (24-bit master) or int16 (32-bit), got {correction.dtype}")
    if param.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"correction needs a bfloat16/float16 param (an fp32 param is its own master), got {param.dtype}")
    if correction.numel() != param.numel() or correction.device != param.device or not correction.is_contiguous():
        raise ValueError(f"correction must be contiguous with the param's {param.numel()} elements on {param.device}")


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
        skipped: torch.Tensor | None = None,
        state3: torch.Tensor | None = None,
        absmax3: torch.Tensor | None = None,
        correction: torch.Tensor | None = None,
    ) -> None:
        """Update ``param`` (or write ``update_out``) and the states in place.

        ``state*`` are uint8 codes with float32 ``absmax*`` (8-bit) or float32
        tensors with ``absmax* = None`` (32-bit); all tensors hold the same
        number of elements in the same (flattened) order. ``state3``/``absmax3``:
        the third state of a rule that keeps one (AdEMAMix's slow EMA; quantized
        with ``qmap1``), else None. A block whose new
        states or outputs are not all finite is skipped (see
        :mod:`dist8.kernels.rules`); ``skipped`` (int64, one element), when
        given, is increased by the number of skipped blocks. ``correction`` (int8: 24-bit, int16:
        32-bit master weights; bf16/fp16 ``param`` only): the rule sees the decoded master
        (:func:`dist8.quant.master.decode_master`) and the new value is re-encoded into ``param`` and
        ``correction`` (:func:`~dist8.quant.master.encode_master`); a skipped block keeps both.
        """
        rule = Rule(rule)
        nstates = len(RULE_STATES[rule])
        corr = None
        if correction is not None and correction.numel():
            check_correction(param, correction)
            corr = correction.detach().view(-1)
        p = param.detach().reshape(-1).float() if corr is None else decode_master(param.detach().reshape(-1), corr)
        g = grad.detach().reshape(-1).float()
        slots = [(state1, absmax1, qmap1), (state2, absmax2, qmap2), (state3, absmax3, qmap1)][:nstates]
        olds = [_load_state(s, a, q, block_size, state_floored(rule, i)) for i, (s, a, q) in enumerate(slots)]
        out, news = apply_rule_states(rule, p, g, olds, scalars, flags)
        n = p.numel()
        ok = finite_blocks(block_size, out, *news) if n else None
        keep = None
        if ok is not None and not bool(ok.all()):
            keep = (~ok).repeat_interleave(block_size)[:n]
            if skipped is not None:
                skipped.add_(int((~ok).sum()))
        for new, (s, a, q) in zip(news, slots):
            _store_state(new, s, a, q, block_size, keep)
        target = (update_out if update_out is not None else param).detach()
        if corr is not None and update_out is None:
            bits = 24 if corr.dtype == torch.int8 else 32
            new_p, new_c = encode_master(out, param.dtype, bits)
            if keep is not None:
                new_p = torch.where(keep, param.detach().reshape(-1), new_p)
                new_c = torch.where(keep, corr, new_c)
            corr.copy_(new_c)
            target.copy_(new_p.view(target.shape))
            return
        if keep is not None:
            old = torch.zeros_like(out) if update_out is not None else p
            out = torch.where(keep, old, out)
        target.copy_(out.view(target.shape))

    def fused_update_multi(self, rule: Rule, updates: list[tuple], qmap1, qmap2, scalars: Scalars, flags: int,
                           block_size: int, skipped: torch.Tensor | None = None,
                           corrections: list[torch.Tensor | None] | None = None) -> None:
        """:meth:`fused_update` for each ``(param, grad, state1, state2, absmax1, absmax2)`` of ``updates``
        (rules with a third state: ``(..., state3, absmax3)``); ``skipped`` (int64, one element per
        tensor), when given, counts each tensor's skipped blocks; ``corrections`` (one per tensor, None
        where it has none) as ``correction`` of :meth:`fused_update`."""
        for i, row in enumerate(updates):
            p, g, s1, s2, a1, a2 = row[:6]
            s3, a3 = row[6:8] if len(row) > 6 else (None, None)
            self.fused_update(rule, p, g, s1, s2, a1, a2, qmap1, qmap2, scalars, flags, block_size,
                              skipped=None if skipped is None else skipped[i:i + 1], state3=s3, absmax3=a3,
                              correction=None if corrections is None else corrections[i])

    def trust_step(self, param: torch.Tensor, update: torch.Tensor, lr_times_ratio: float,
                   correction: torch.Tensor | None = None) -> None:
        """LAMB/LARS phase 2 in place: ``param <- param - fl32(lr_times_ratio) * update``
        (:func:`dist8.kernels.rules.trust_step` in float32, stored in ``param``'s dtype).
        ``update`` is the float32 direction :meth:`fused_update` wrote to ``update_out``. With a
        ``correction`` (master weights, as in :meth:`fused_update`) the step runs on the decoded
        master and the result is re-encoded into ``param`` and ``correction``."""
        p = param.detach()
        u = update.detach().reshape(-1).float()
        if correction is None or not correction.numel():
            p.copy_(trust_step(p.reshape(-1).float(), u, lr_times_ratio).view(p.shape))
            return
        check_correction(param, correction)
        corr = correction.detach().view(-1)
        new = trust_step(decode_master(p.reshape(-1), corr), u, lr_times_ratio)
        new_p, new_c = encode_master(new, param.dtype, 24 if corr.dtype == torch.int8 else 32)
        corr.copy_(new_c)
        p.copy_(new_p.view(p.shape))

    def all_finite(self, grad: torch.Tensor) -> bool:
        """True when every element of ``grad`` is finite."""
        return bool(torch.isfinite(grad).all())

    def all_finite_many(self, grads: list[torch.Tensor]) -> list[bool]:
        """:meth:`all_finite` of each tensor."""
        return [self.all_finite(g) for g in grads]
