"""The step pipeline of :class:`dist8.optim.base.Optimizer8bit`: from the parameters that have a
gradient to kernel calls.

One step, in order:

1. per-parameter partial sums, summed across shards in one collective (identity when
   unsharded): non-finite flags, squared gradient norms (percentile clipping), and
   torch.amp.GradScaler's found-inf;
2. skip the whole step if GradScaler found inf/NaN; else per parameter: skip (or raise on)
   a non-finite gradient (``on_nonfinite="skip_param"``/``"raise"`` only: the default
   ``"skip"`` leaves it to the kernels, which skip non-finite blocks and count them, see
   :mod:`dist8.optim.nonfinite`), scale for percentile clipping, and hand it to the kernel —
   plain tensors sharing rule, scalars and block size in one multi-tensor call, DTensor
   shards through :mod:`dist8.optim.dtensor_update`;
3. LAMB/LARS: the trust ratio from the parameter and update norms (summed across shards),
   then ``p -= lr * ratio * update`` (the backend's ``trust_step``: rule spec + kernels).

With ``master_weight_bits`` a parameter's ``"correction"`` goes to the kernel with it (decode,
rule, re-encode in one pass); LAMB/LARS phase 2 takes the parameter norm from the master
(:mod:`dist8.quant.master`) and the backend's ``trust_step`` decodes, steps and re-encodes.

Only the optimizer's public API is used here.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from dist8.kernels import RULE_WRITES_UPDATE, Scalars, get_backend
from dist8.optim import dtensor_layout as dtl
from dist8.optim import dtensor_update
from dist8.optim.config import PIECE_START_ATTR
from dist8.optim.master_weights import master_value
from dist8.optim.state_schema import CORRECTION, GNORM, PERCENTILE_HISTORY, absmax_key, is_signed, n_states, state_key

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit, ParamSettings

__all__ = ["UpdateItem", "TrustItem", "run_updates", "square_sums", "fused_update_state", "counts_whole_skip"]

FLOAT32_MAX = torch.finfo(torch.float32).max
TRUST_SCALE_LIMIT = 2.0**100  # lr * trust ratio above this goes to the kernel partly as a power of two on the update


class UpdateItem(NamedTuple):
    """A parameter that has a gradient this step, with its resolved settings and state dict."""

    param: torch.Tensor
    settings: ParamSettings
    state: dict[str, Any]


class TrustItem(NamedTuple):
    """A LAMB/LARS parameter whose kernel wrote its update direction (phase 2 pending)."""

    slot: int
    param: torch.Tensor
    settings: ParamSettings
    update: torch.Tensor
    correction: torch.Tensor | None = None  # master_weight_bits: the parameter's correction


def square_sums(tensors: list[torch.Tensor]) -> list[float]:
    """``sum(t.double() ** 2)`` of each tensor, copied to the host once per device, not once per
    tensor (on a GPU each copy is a sync)."""
    out = [0.0] * len(tensors)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idx in by_device.values():
        values = torch.stack([tensors[i].detach().double().square().sum() for i in idx]).tolist()
        for i, v in zip(idx, values):
            out[i] = v
    return out


def counts_whole_skip(p: torch.Tensor) -> bool:
    """Whether this rank counts a skip of the whole parameter ``p`` (``on_nonfinite="skip_param"``/
    ``"raise"``): every rank holding a part of it skips it, one counts it -- the rank at the first
    coordinate of a DTensor's mesh, the piece starting at element 0 of a sharded wrapper's parameter --
    so that the counts summed over ranks are the unsharded run's."""
    if dtl.is_dtensor(p):
        return dtl.counts_skips(p, whole=True)
    return getattr(p, PIECE_START_ATTR, 0) == 0


def _reduce(opt: Optimizer8bit, values: torch.Tensor) -> torch.Tensor:
    return opt.reduce_partials(values) if opt.reduce_partials is not None else values


def run_updates(opt: Optimizer8bit, items: list[UpdateItem], amp: tuple[float, bool] | None = None) -> None:
    """Update every item (see the module docstring)."""
    slots, n = opt.partial_slots(items)
    sharded = opt.reduce_partials is not None
    # Per-parameter partials, summed across shards in one call:
    # [non-finite flags | grad squares | GradScaler found inf (any rank)].
    partials = torch.zeros(2 * n + 1, dtype=torch.float64)
    need_gnorm = any(g["percentile_clipping"] < 100 for g in opt.param_groups) or any(
        it.settings.hyper["percentile_clipping"] < 100 for it in items
    )
    inv_scale = 1.0 if amp is None else amp[0]
    # GradScaler has checked every gradient already; "skip" needs no pre-pass (the kernels skip blocks)
    check = opt.check_finite and amp is None and opt.on_nonfinite != "skip"
    if amp is not None and amp[1]:
        partials[2 * n] = 1.0
    to_check: dict[torch.device, list] = {}  # one pass over all gradients of a device
    to_norm: list = []  # (slot, gradient) for percentile clipping
    dtensors = opt.uses_dtensor  # all parameters are DTensors, or none (checked when added)
    for slot, (p, settings, _state) in zip(slots, items):
        grad = dtl.local(p.grad) if dtensors else p.grad
        if check:
            to_check.setdefault(grad.device, []).append((slot, grad))
        if need_gnorm and settings.hyper["percentile_clipping"] < 100 and id(p) not in opt.partials_counted_elsewhere:
            to_norm.append((slot, grad))
    for (slot, _), sq in zip(to_norm, square_sums([g for _, g in to_norm])):
        partials[n + slot] += sq * inv_scale * inv_scale  # the history holds unscaled norms
    for device, pairs in to_check.items():
        finite = get_backend(device).all_finite_many([g for _, g in pairs])
        for (slot, _), ok in zip(pairs, finite):
            if not ok:
                partials[slot] = 1.0
    if sharded or check or need_gnorm:
        partials = _reduce(opt, partials)
    partials = partials.tolist()  # read once per parameter below: floats, not tensor indexing
    if partials[2 * n] > 0:  # GradScaler found inf/NaN (on some rank): skip the whole step
        opt.amp_skips += 1
        return
    opt.skip_counter.new_step()
    if opt.on_nonfinite == "raise" and check:
        # Before any update, on every rank (the flags are summed across shards): raised at the first
        # flagged parameter of the loop below, it stepped the parameters before it, and a rank holding no
        # piece of the flagged one went on into the parameter all-gather alone, where the others never came.
        bad = next((slot for slot in range(n) if partials[slot] > 0), None)
        if bad is not None:
            held = {slot: (p, settings.name) for slot, (p, settings, _) in zip(slots, items)}
            name = held[bad][1] if bad in held else (
                opt.global_slot_names[bad] if opt.global_slot_names else f"in slot {bad}")
            if bad in held and counts_whole_skip(held[bad][0]):
                opt.skip_counter.add_param(name)
            raise FloatingPointError(f"non-finite gradient in parameter {name}; step skipped, state untouched")
    trust_items: list[TrustItem] = []
    edges = dtensor_update.EdgeBatch() if dtensors else None  # shard-edge blocks, finished after the loop
    # Plain tensors whose kernel calls differ only in the tensors go to the kernel together
    # (one call instead of one per parameter; LAMB/LARS need their update direction back).
    # key -> (scalars, kernel rows, names, corrections, (state, its new step) per row)
    batches: dict[tuple, tuple[Scalars, list, list, list, list]] = {}
    scalars_memo: dict[tuple, tuple] = {}
    batchable = opt.rule not in RULE_WRITES_UPDATE
    # A parameter's step count and gradient-norm history change only with its update: a kernel call that fails
    # (state edited by hand) left every parameter of its batch counted as stepped, and its history holding
    # this step's norm, though none was updated. id(state) -> the history entry to put back until committed.
    uncommitted: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}
    try:
        for slot, (p, settings, state) in zip(slots, items):
            if partials[slot] > 0:
                if counts_whole_skip(p):
                    opt.skip_counter.add_param(settings.name)
                continue
            step = state["step"] + 1
            grad_scale = inv_scale
            if settings.hyper["percentile_clipping"] < 100:
                history, at = state[GNORM], (step - 1) % PERCENTILE_HISTORY
                uncommitted[id(state)] = (history, at, history[at].clone())  # a copy on its device: no host sync
                grad_scale *= _percentile_scale(state, float(partials[n + slot]), step,
                                                settings.hyper["percentile_clipping"])
            if dtensors:
                update = dtensor_update.update(opt, p, state, settings, step, grad_scale, edges)
            elif batchable:
                # Parameters sharing a hyper dict (a group without overrides) share their scalars.
                memo_key = (id(settings.hyper), step, grad_scale)
                memo = scalars_memo.get(memo_key)
                if memo is None:
                    scalars, flags = opt.kernel_scalars(settings.hyper, step, grad_scale)
                    memo = scalars_memo[memo_key] = (scalars, flags, scalars.as_tuple())
                scalars, flags, values = memo
                key = (values, flags, settings.block_size, settings.use_8bit, p.device)
                batch = batches.setdefault(key, (scalars, [], [], [], []))
                batch[1].append(kernel_tensors(opt, p, state))
                batch[2].append(settings.name)
                batch[3].append(state.get(CORRECTION))
                batch[4].append((state, step))
                continue  # counted when its batch's kernel call has run (_run_batches)
            else:
                update = _update_one(opt, p, state, settings, step, grad_scale)
            state["step"] = step
            uncommitted.pop(id(state), None)
            if update is not None:
                trust_items.append(TrustItem(slot, p, settings, update, state.get(CORRECTION)))
        _run_batches(opt, batches, uncommitted)
    except BaseException:
        for history, at, value in uncommitted.values():
            history[at] = value
        raise
    if edges is not None:
        edges.finish()
    if trust_items or (sharded and opt.rule in RULE_WRITES_UPDATE):
        _apply_trust_ratios(opt, trust_items, n)


def _percentile_scale(state: dict, gnorm_sq: float, step: int, percentile: float) -> float:
    if not math.isfinite(gnorm_sq):
        # an inf/NaN gradient (on_nonfinite="skip": its blocks are skipped by the kernel): leave
        # the history alone, or the NaN would clip every later step of this parameter to NaN
        return 1.0
    history = state[GNORM]
    # the fp32 history saturates: a finite gradient's square norm above 3.4e38 (|g| ~ 1.8e19) is
    # still clipped (by the float64 ratio below), not turned into an overflow error mid-step
    at = (step - 1) % PERCENTILE_HISTORY
    history[at] = min(gnorm_sq, FLOAT32_MAX)
    if gnorm_sq == 0 or not bool(history[at] > 0):  # (a square norm below fp32's range is stored as 0 too)
        return 1.0
    # A zero entry is a step without gradient (an unused module under zero_grad(set_to_none=False), an MoE
    # expert not routed), not a sample: counted, more than p% of them in the window made the percentile 0 and
    # scaled every real gradient to exactly 0, so the parameter stopped learning while they stayed there.
    filled = history[: min(step, PERCENTILE_HISTORY)]
    clip_sq = float(torch.quantile(filled[filled > 0], percentile / 100.0, interpolation="lower"))
    return 1.0 if gnorm_sq <= clip_sq else math.sqrt(clip_sq / gnorm_sq)


def kernel_tensors(opt: Optimizer8bit, p: torch.Tensor, state: dict, grad: torch.Tensor | None = None) -> tuple:
    """(param, grad, state1, state2, absmax1, absmax2) of one parameter, as the kernels take them;
    rules with a third state (AdEMAMix) add (state3, absmax3). ``grad``: default ``p.grad``."""
    count = n_states(opt.rule)
    two = count >= 2
    grad = p.grad if grad is None else grad
    row = (p.detach(), grad.detach(), state[state_key(1)], state[state_key(2)] if two else None,
           state.get(absmax_key(1)), state.get(absmax_key(2)) if two else None)
    if count > 2:
        row += (state[state_key(3)], state.get(absmax_key(3)))
    return row


def kernel_qmaps(opt: Optimizer8bit, device: torch.device, use_8bit: bool) -> tuple:
    """The (state1, state2) quantization maps on ``device`` (None for 32-bit state or a missing state)."""
    if not use_8bit:
        return None, None
    two = n_states(opt.rule) >= 2  # a third state is quantized with the first map (kernels: state_qmap_index)
    return opt.qmap(device, is_signed(opt.rule, 1)), (opt.qmap(device, is_signed(opt.rule, 2)) if two else None)


def _run_batches(opt: Optimizer8bit, batches: dict, uncommitted: dict[int, tuple]) -> None:
    """One kernel call per group of parameters collected by run_updates; once a call has run, its parameters'
    new step counts are stored and their history entries leave ``uncommitted``."""
    for (_, flags, block_size, use_8bit, device), (scalars, rows, names, corrections, steps) in batches.items():
        q1, q2 = kernel_qmaps(opt, device, use_8bit)
        skipped = torch.zeros(len(rows), dtype=torch.int64, device=device)
        extra = {"corrections": corrections} if any(c is not None for c in corrections) else {}
        get_backend(device).fused_update_multi(opt.rule, rows, q1, q2, scalars, flags, block_size, skipped, **extra)
        for state, step in steps:
            state["step"] = step
            uncommitted.pop(id(state), None)
        opt.skip_counter.add_blocks(names, skipped)
    batches.clear()


def _update_one(opt: Optimizer8bit, p: torch.Tensor, state: dict, settings: ParamSettings, step: int,
                grad_scale: float) -> torch.Tensor | None:
    scalars, flags = opt.kernel_scalars(settings.hyper, step, grad_scale)
    update = None
    if opt.rule in RULE_WRITES_UPDATE:
        update = torch.empty(p.numel(), dtype=torch.float32, device=p.device)
    skipped = torch.zeros(1, dtype=torch.int64, device=p.device)
    fused_update_state(opt, p, p.grad, state, kernel_qmaps(opt, p.device, settings.use_8bit), scalars, flags,
                       settings.block_size, update, skipped)
    opt.skip_counter.add_blocks([settings.name], skipped)
    return update


def fused_update_state(opt: Optimizer8bit, p: torch.Tensor, grad: torch.Tensor, state: dict, qmaps: tuple,
                       scalars: Scalars, flags: int, block_size: int, update: torch.Tensor | None,
                       skipped: torch.Tensor, backend: Any = None) -> None:
    """One fused kernel call: ``p`` (a parameter, or a flat block-aligned range of one) with
    ``grad`` and its ``state`` dict (or views of the same range), through ``backend`` (default:
    ``p``'s device's). ``skipped`` is increased by the blocks skipped."""
    row = kernel_tensors(opt, p, state, grad)
    extra = dict(state3=row[6], absmax3=row[7]) if len(row) > 6 else {}
    if CORRECTION in state:
        extra["correction"] = state[CORRECTION]
    (backend or get_backend(p.device)).fused_update(
        opt.rule, *row[:6], *qmaps, scalars, flags, block_size, update, skipped, **extra
    )


def _apply_trust_ratios(opt: Optimizer8bit, trust_items: list[TrustItem], n_slots: int) -> None:
    sums = torch.zeros(2 * n_slots, dtype=torch.float64)
    masters = [master_value(dtl.local(it.param), it.correction) for it in trust_items]
    squares = square_sums([t for it, m in zip(trust_items, masters) for t in (m, it.update)])
    for k, it in enumerate(trust_items):
        if id(it.param) in opt.partials_counted_elsewhere:  # a replica: another rank adds its norms
            continue
        sums[2 * it.slot] += squares[2 * k]
        sums[2 * it.slot + 1] += squares[2 * k + 1]
    sums = _reduce(opt, sums)
    for it, master in zip(trust_items, masters):
        ratio = opt.trust_ratio(it.settings.hyper, math.sqrt(sums[2 * it.slot]), math.sqrt(sums[2 * it.slot + 1]))
        p = dtl.local(it.param)
        scale = it.settings.hyper["lr"] * ratio
        update = it.update
        if scale > TRUST_SCALE_LIMIT:
            # A tiny update direction (subnormal-scale gradients) has a ratio p_norm / u_norm beyond
            # fp32's range, which the kernel's fp32 scale would make inf (parameters inf/NaN after one
            # step). The product scale * update is moderate (about lr * p_norm per unit direction), so
            # move powers of two from the scale to the update: exact, and the same result wherever
            # the fp32 scale would have been finite.
            shift = math.frexp(scale)[1] - math.frexp(TRUST_SCALE_LIMIT)[1]
            update = update * 2.0**shift
            scale = math.ldexp(scale, -shift)
        # the kernel decodes (param, correction) to the master, steps it and re-encodes both
        get_backend(p.device).trust_step(p, update, scale, it.correction)
