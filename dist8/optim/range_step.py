"""One optimizer step of one parameter, applied range by range as parts of its gradient arrive.

``RangeStep(opt, p)`` resolves ``p``'s settings and state once, ``update(start, grad)`` runs the
fused kernel on elements ``[start, start + grad.numel())`` of the flattened parameter with that
part of the gradient, and ``finish()`` counts the step. Used by gradient release
(:mod:`dist8.optim.chunked_grads`) so that a layer's weight gradient never exists whole.

Exactness. The kernels update every quantization block independently (dequantize, rule,
absmax of the new state, requantize, per-block non-finite skip) with scalars that depend only
on the step number and the hyperparameters. A range that starts on a block edge and ends on
one (or at the parameter's end) therefore gets bitwise the values that one whole-parameter
step gives those blocks: updating the ranges one at a time is one :meth:`Optimizer8bit.step`
of the parameter (``tests/test_chunked_grads.py``).

What cannot be split, and why (:func:`range_step_refusal` says which applies):

* LAMB/LARS: the trust ratio needs the norm of the whole update before any element moves.
* ``percentile_clipping < 100``: the clip factor needs the whole gradient's norm.
* ``on_nonfinite="skip_param"``/``"raise"`` (with ``check_finite``): the whole gradient is
  checked before any element moves. The default ``"skip"`` is per block, so it splits.
* DTensor (FSDP2) parameters: their shard-edge blocks need collectives per step.
* Non-contiguous or empty parameters.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dist8.kernels import RULE_WRITES_UPDATE, get_backend
from dist8.optim.config import hyperparameters_of
from dist8.optim.pipeline import fused_update_state, kernel_qmaps
from dist8.optim.state_schema import CORRECTION, absmax_key, n_states, state_key

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit, ParamSettings

__all__ = ["RangeStep", "optimizer_range_refusal", "range_step_refusal"]


def optimizer_range_refusal(opt: Optimizer8bit) -> str | None:
    """Why none of ``opt``'s parameters can be stepped range by range (a phrase), or None."""
    if opt.rule in RULE_WRITES_UPDATE:
        return f"{type(opt).__name__}'s trust ratio needs the norm of the whole update"
    if opt.check_finite and opt.on_nonfinite != "skip":
        return f"on_nonfinite={opt.on_nonfinite!r} checks the whole gradient before the update"
    if opt.uses_dtensor:
        return "DTensor (FSDP2) parameters step their shard-edge blocks with collectives"
    return None


def range_step_refusal(opt: Optimizer8bit, p: torch.Tensor, settings: ParamSettings | None = None) -> str | None:
    """Why ``p``'s step cannot be applied range by range (a phrase), or None when it can.

    ``settings``: ``p``'s resolved settings if the caller has them (else resolved here).
    """
    refusal = optimizer_range_refusal(opt)  # DTensors: all of opt's parameters are, or none
    if refusal is not None:
        return refusal
    if not p.is_contiguous() or not p.numel() or p.is_meta:
        return "the parameter is empty, meta or not contiguous"
    if settings is None:
        settings = opt.settings(p, opt.group_of(p))
    if settings.hyper["percentile_clipping"] < 100:
        return "percentile_clipping needs the whole gradient's norm"
    return None


class RangeStep:
    """One step of plain parameter ``p`` of ``opt``, applied to block-aligned ranges in any order.

    Args:
        opt: the dist8 optimizer that holds ``p``.
        p: a parameter of ``opt`` for which :func:`range_step_refusal` is None (ValueError otherwise).

    ``update(start, grad)`` for ranges that together cover every element once, then ``finish()``.
    ``block_size`` is the alignment ``start`` (and the end of every range but the last) needs.
    Runs no step hooks and no GradScaler unscaling (gradient release refuses the scaler).
    """

    def __init__(self, opt: Optimizer8bit, p: torch.Tensor) -> None:
        group = opt.group_of(p)
        group_hyper = hyperparameters_of(group)
        opt.check_changed_group(group, group_hyper)
        settings = opt.settings(p, group, group_hyper)
        refusal = range_step_refusal(opt, p, settings)
        if refusal is not None:
            raise ValueError(f"parameter {settings.name} cannot be stepped range by range: {refusal}")
        state = opt.param_state(p, settings)
        opt.check_state_fits(p, settings, state)
        self.opt = opt
        self.param = p
        self.settings = settings
        self.state = state
        self.block_size = settings.block_size
        self.step = state["step"] + 1
        self.scalars, self.flags = opt.kernel_scalars(settings.hyper, self.step, 1.0)
        self.qmaps = kernel_qmaps(opt, p.device, settings.use_8bit)
        self.backend = get_backend(p.device)
        # Flat views made once: a chunk's update slices them (per-chunk Python work is the cost of
        # small chunks). Per value: states 1..3 and the correction; per block: the absmax.
        count = n_states(opt.rule)
        keys = [state_key(i) for i in range(1, count + 1)] + ([CORRECTION] if CORRECTION in state else [])
        self._flat_param = p.detach().view(-1)
        self._values = {k: state[k].view(-1) for k in keys}
        self._scales = {k: state[k] for k in (absmax_key(i) for i in range(1, count + 1)) if k in state}
        self.skipped = torch.zeros(1, dtype=torch.int64, device=p.device)  # blocks skipped, all ranges
        self.done = 0  # elements updated so far
        opt.skip_counter.new_step()

    def update(self, start: int, grad: torch.Tensor) -> None:
        """Step elements ``[start, start + grad.numel())`` of the flattened parameter with ``grad``
        (any shape with that many elements, the parameter's dtype; contiguous)."""
        p, n, block = self.param, self.param.numel(), self.block_size
        end = start + grad.numel()
        if start % block or (end % block and end != n) or not 0 <= start < end <= n:
            raise ValueError(f"range [{start}, {end}) of parameter {self.settings.name} ({n} elements) does not "
                             f"start and end on blocks of {block}")
        if grad.dtype != p.dtype or grad.device != p.device:
            raise ValueError(f"gradient range of parameter {self.settings.name} is {grad.dtype} on {grad.device}, "
                             f"the parameter {p.dtype} on {p.device}")
        b0, b1 = start // block, -(-end // block)
        view = {k: t[start:end] for k, t in self._values.items()}  # the range's state, as a state dict
        view.update((k, t[b0:b1]) for k, t in self._scales.items())
        fused_update_state(self.opt, self._flat_param[start:end], grad.reshape(-1), view, self.qmaps, self.scalars,
                           self.flags, block, None, self.skipped, self.backend)
        self.done += end - start

    def finish(self) -> None:
        """Count the step (``state["step"]``); every element must have been updated once."""
        self.opt.skip_counter.add_blocks([self.settings.name], self.skipped)
        if self.done != self.param.numel():
            raise RuntimeError(f"parameter {self.settings.name}: ranges covered {self.done} of "
                               f"{self.param.numel()} elements; the step is not counted")
        self.state["step"] = self.step
