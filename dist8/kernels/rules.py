"""The update rules, each written once.

This module is the specification: the reference backend runs these functions
directly on float32 tensors, and ``csrc/include/dist8_rules.h`` mirrors them
operation for operation (same order, no fused multiply-add) so that the C++ and
CUDA kernels produce bit-identical state. Change both together.

Every rule receives float32 ``p`` (parameter), ``g`` (gradient), the float32
states and a :class:`Scalars`; it returns ``(out, s1, s2)`` (AdEMAMix: ``(out, s1, s2, s3)``)
where ``out`` is the new parameter, or the update direction ``u`` for rules whose final step is
scaled by a trust ratio (LAMB, LARS: ``p <- p - lr * ratio * u`` afterwards, by
:func:`trust_step` once the ratio is known from the norms of ``p`` and ``u``).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from dist8.quant import dequantize_blockwise

__all__ = [
    "Rule", "Scalars", "FLAG_FIRST_STEP", "FLAG_NESTEROV", "RULE_STATES", "RULE_WRITES_UPDATE", "apply_rule",
    "state_floored", "state_floor_fraction", "floor_state", "read_state", "finite_blocks", "trust_step",
    "apply_rule_states",
    "state_qmap_index",
]

FLAG_FIRST_STEP = 1  # momentum buffer starts as the gradient (SGD/LARS)
FLAG_NESTEROV = 2


class Rule(enum.IntEnum):
    """Rule ids shared with the C++/CUDA kernels (keep in sync with dist8_rules.h)."""

    ADAM = 0
    LAMB = 1
    SGD = 2
    LARS = 3
    RMSPROP = 4
    ADAGRAD = 5
    LION = 6
    ADEMAMIX = 7
    RMSPROP_MOMENTUM = 8


# Number of states and, per state, whether it is signed (signed dynamic map) or
# non-negative (unsigned map).
RULE_STATES: dict[Rule, tuple[bool, ...]] = {
    Rule.ADAM: (True, False),
    Rule.LAMB: (True, False),
    Rule.SGD: (True,),
    Rule.LARS: (True,),
    Rule.RMSPROP: (False,),
    Rule.ADAGRAD: (False,),
    Rule.LION: (True,),
    # m1 (fast EMA), nu (second moment), m2 (slow EMA; quantized with state 1's map, qmap1)
    Rule.ADEMAMIX: (True, False, True),
    # torch's RMSprop with momentum: square average (unsigned), momentum buffer (signed)
    Rule.RMSPROP_MOMENTUM: (False, True),
}
RULE_WRITES_UPDATE = frozenset({Rule.LAMB, Rule.LARS})


@dataclass(frozen=True)
class Scalars:
    """Per-step scalars; the kernels receive them as float32 in this field order.

    The fields are kernel slots: generic names whose meaning depends on the rule (see each
    rule below); unused ones are ignored. Build them with the rule's constructor, which takes
    the rule's own names and fills the slots:

    =================  ===============================================================
    constructor        slots filled (rule name -> slot)
    =================  ===============================================================
    ``for_adam``       Adam/AdamW/LAMB: beta1, beta2, eps, bc1, bc2_sqrt, grad_wd,
                       decay, update_wd (LAMB's decoupled decay on the update)
    ``for_momentum``   SGD/LARS: momentum -> beta1, 1 - dampening -> one_minus_beta1,
                       weight_decay -> grad_wd
    ``for_rmsprop``    alpha -> beta1, 1 - alpha -> one_minus_beta1, eps,
                       weight_decay -> grad_wd
    ``for_adagrad``    eps, weight_decay -> grad_wd (``lr`` already decayed)
    ``for_lion``       beta1 (interpolation), beta2 (momentum decay), decay
    ``for_rmsprop``    with momentum (RMSPROP_MOMENTUM): momentum -> beta2
    ``for_ademamix``   Adam's slots plus beta3 / one_minus_beta3 (slow EMA), alpha
    =================  ===============================================================
    """

    lr: float = 0.0  # step size (Adam: lr / bias_correction1; Adagrad: decayed lr)
    beta1: float = 0.0  # Adam/Lion beta1, SGD momentum, RMSprop alpha
    one_minus_beta1: float = 1.0  # 1 - beta1 (SGD: 1 - dampening)
    beta2: float = 0.0
    one_minus_beta2: float = 1.0
    eps: float = 0.0
    grad_wd: float = 0.0  # L2 penalty added to the gradient
    decay: float = 1.0  # multiplicative parameter decay (decoupled weight decay: 1 - lr * wd)
    bc1: float = 1.0  # bias correction of the first moment (LAMB)
    bc2_sqrt: float = 1.0  # sqrt of the bias correction of the second moment
    grad_scale: float = 1.0  # gradient scale (percentile clipping)
    update_wd: float = 0.0  # weight decay added to the update direction (LAMB)
    beta3: float = 0.0  # AdEMAMix: decay of the slow EMA m2 (after its warm-up scheduler)
    one_minus_beta3: float = 1.0
    alpha: float = 0.0  # AdEMAMix: weight of the slow EMA (after its warm-up scheduler)

    @classmethod
    def for_adam(cls, *, lr: float, beta1: float, beta2: float, eps: float, bc1: float = 1.0, bc2_sqrt: float = 1.0,
                 grad_wd: float = 0.0, decay: float = 1.0, update_wd: float = 0.0, grad_scale: float = 1.0) -> Scalars:
        """Adam/AdamW (``lr`` already divided by ``bc1``) and LAMB (``bc1`` applied in the rule)."""
        return cls(lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
                   grad_wd=grad_wd, decay=decay, bc1=bc1, bc2_sqrt=bc2_sqrt, grad_scale=grad_scale, update_wd=update_wd)

    @classmethod
    def for_momentum(cls, *, lr: float, momentum: float, dampening: float = 0.0, weight_decay: float = 0.0,
                     grad_scale: float = 1.0) -> Scalars:
        """SGD with momentum and LARS: ``m = momentum * m + (1 - dampening) * g``."""
        return cls(lr=lr, beta1=momentum, one_minus_beta1=1.0 - dampening, grad_wd=weight_decay, grad_scale=grad_scale)

    @classmethod
    def for_rmsprop(cls, *, lr: float, alpha: float, eps: float, weight_decay: float = 0.0, momentum: float = 0.0,
                    grad_scale: float = 1.0) -> Scalars:
        """RMSprop: ``v = alpha * v + (1 - alpha) * g * g``; with ``momentum`` (rule RMSPROP_MOMENTUM)
        ``buf = momentum * buf + g / (sqrt(v) + eps)``."""
        return cls(lr=lr, beta1=alpha, one_minus_beta1=1.0 - alpha, beta2=momentum, eps=eps, grad_wd=weight_decay,
                   grad_scale=grad_scale)

    @classmethod
    def for_adagrad(cls, *, lr: float, eps: float, weight_decay: float = 0.0, grad_scale: float = 1.0) -> Scalars:
        """Adagrad (``lr`` already decayed for this step)."""
        return cls(lr=lr, eps=eps, grad_wd=weight_decay, grad_scale=grad_scale)

    @classmethod
    def for_lion(cls, *, lr: float, beta1: float, beta2: float, decay: float = 1.0, grad_scale: float = 1.0) -> Scalars:
        """Lion: the sign of ``beta1 * m + (1 - beta1) * g``; then ``m = beta2 * m + (1 - beta2) * g``."""
        return cls(lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2,
                   decay=decay, grad_scale=grad_scale)

    @classmethod
    def for_ademamix(cls, *, lr: float, beta1: float, beta2: float, beta3: float, alpha: float, eps: float, bc1: float,
                     bc2_sqrt: float, decay: float = 1.0, grad_scale: float = 1.0) -> Scalars:
        """AdEMAMix: Adam's slots plus the slow EMA's decay ``beta3`` and weight ``alpha`` (both after
        their warm-up schedulers)."""
        return cls(lr=lr, beta1=beta1, one_minus_beta1=1.0 - beta1, beta2=beta2, one_minus_beta2=1.0 - beta2, eps=eps,
                   decay=decay, bc1=bc1, bc2_sqrt=bc2_sqrt, grad_scale=grad_scale, beta3=beta3,
                   one_minus_beta3=1.0 - beta3, alpha=alpha)

    def as_tuple(self) -> tuple[float, ...]:
        # not dataclasses.astuple: it deep-copies every field (a third of the per-parameter
        # Python cost of an optimizer step)
        return (self.lr, self.beta1, self.one_minus_beta1, self.beta2, self.one_minus_beta2, self.eps, self.grad_wd,
                self.decay, self.bc1, self.bc2_sqrt, self.grad_scale, self.update_wd, self.beta3,
                self.one_minus_beta3, self.alpha)


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _sqrt(x: torch.Tensor) -> torch.Tensor:
    # torch's vectorised float32 sqrt is not always correctly rounded on CPU;
    # the kernels use IEEE sqrt, which equals the float64 sqrt rounded to float32.
    return torch.sqrt(x.double()).float()


def _adam(p, g, m, v, c, flags, write_update):
    g = g * c.grad_scale
    g = g + c.grad_wd * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * (g * g)
    denom = _sqrt(v) / c.bc2_sqrt + c.eps
    if write_update:  # LAMB
        u = (m / c.bc1) / denom
        return u + c.update_wd * p, m, v
    p = p * c.decay
    return p - c.lr * (m / denom), m, v


def _momentum(p, g, m, c, flags, write_update):
    g = g * c.grad_scale
    g = g + c.grad_wd * p
    m = g.clone() if flags & FLAG_FIRST_STEP else c.beta1 * m + c.one_minus_beta1 * g
    d = g + c.beta1 * m if flags & FLAG_NESTEROV else m
    if write_update:  # LARS
        return d, m
    return p - c.lr * d, m


def _rmsprop(p, g, v, c):
    g = g * c.grad_scale
    g = g + c.grad_wd * p
    v = c.beta1 * v + c.one_minus_beta1 * (g * g)
    return p - c.lr * (g / (_sqrt(v) + c.eps)), v


def _rmsprop_momentum(p, g, v, buf, c):
    # torch.optim.RMSprop(momentum > 0): buf = momentum * buf + g / (sqrt(v) + eps); p -= lr * buf.
    # beta2 is the momentum (beta1 the square average's alpha, as for RMSPROP).
    g = g * c.grad_scale
    g = g + c.grad_wd * p
    v = c.beta1 * v + c.one_minus_beta1 * (g * g)
    buf = c.beta2 * buf + g / (_sqrt(v) + c.eps)
    return p - c.lr * buf, v, buf


def _adagrad(p, g, s, c):
    g = g * c.grad_scale
    g = g + c.grad_wd * p
    s = s + g * g
    return p - c.lr * (g / (_sqrt(s) + c.eps)), s


def _lion(p, g, m, c):
    g = g * c.grad_scale
    direction = torch.sign(c.beta1 * m + c.one_minus_beta1 * g)
    p = p * c.decay
    p = p - c.lr * direction
    m = c.beta2 * m + c.one_minus_beta2 * g
    return p, m


def _ademamix(p, g, m1, nu, m2, c):
    # Pagliardini et al. 2024, as bitsandbytes: bias-corrected fast EMA m1 plus alpha times the
    # slow EMA m2 (no bias correction), over Adam's denominator; decoupled weight decay first
    # (decay = 1 - lr * wd, the paper's p -= lr * wd * p_old).
    g = g * c.grad_scale
    m1 = c.beta1 * m1 + c.one_minus_beta1 * g
    m2 = c.beta3 * m2 + c.one_minus_beta3 * g
    nu = c.beta2 * nu + c.one_minus_beta2 * (g * g)
    denom = _sqrt(nu) / c.bc2_sqrt + c.eps
    p = p * c.decay
    return p - c.lr * ((m1 / c.bc1 + c.alpha * m2) / denom), m1, nu, m2


def state_qmap_index(rule: Rule, index: int) -> int:
    """Which quantization map (0: ``qmap1``, 1: ``qmap2``) 8-bit state ``index`` (0-based) of ``rule``
    uses: state ``i`` uses map ``i``, except AdEMAMix's third state (m2), which uses ``qmap1``."""
    return 0 if index == 2 else index


def apply_rule_states(rule: Rule, p: torch.Tensor, g: torch.Tensor, states: list, scalars: Scalars,
                      flags: int = 0) -> tuple[torch.Tensor, list]:
    """:func:`apply_rule` for any number of states: ``states`` holds ``len(RULE_STATES[rule])``
    float32 tensors; returns ``(new_param_or_update, new_states)``."""
    n = len(RULE_STATES[Rule(rule)])
    if n == 3:
        out, s1, s2, s3 = apply_rule(rule, p, g, states[0], states[1], scalars, flags, s3=states[2])
        return out, [s1, s2, s3]
    out, s1, s2 = apply_rule(rule, p, g, states[0], states[1] if n > 1 else None, scalars, flags)
    return out, [s1, s2][:n]


def apply_rule(
    rule: Rule,
    p: torch.Tensor,
    g: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor | None,
    scalars: Scalars,
    flags: int = 0,
    s3: torch.Tensor | None = None,
) -> tuple:
    """Run ``rule`` on float32 tensors; returns ``(new_param_or_update, new_s1, new_s2)``, and for
    AdEMAMix (three states; ``s3`` is its slow EMA m2) ``(new_param, new_m1, new_nu, new_m2)``.

    Scalars are rounded to float32 first, exactly as the kernels receive them.
    """
    c = Scalars(*(float(_f32(x)) for x in scalars.as_tuple()))
    if rule == Rule.ADEMAMIX:
        return _ademamix(p, g, s1, s2, s3, c)
    if rule in (Rule.ADAM, Rule.LAMB):
        return _adam(p, g, s1, s2, c, flags, rule == Rule.LAMB)
    if rule in (Rule.SGD, Rule.LARS):
        out, m = _momentum(p, g, s1, c, flags, rule == Rule.LARS)
        return out, m, None
    if rule == Rule.RMSPROP:
        out, v = _rmsprop(p, g, s1, c)
        return out, v, None
    if rule == Rule.RMSPROP_MOMENTUM:
        return _rmsprop_momentum(p, g, s1, s2, c)
    if rule == Rule.ADAGRAD:
        out, s = _adagrad(p, g, s1, c)
        return out, s, None
    if rule == Rule.LION:
        out, m = _lion(p, g, s1, c)
        return out, m, None
    raise ValueError(f"unknown rule {rule!r}")


def trust_step(p: torch.Tensor, u: torch.Tensor, lr_times_ratio: float) -> torch.Tensor:
    """LAMB/LARS phase 2 on float32 tensors: ``p - fl32(lr * ratio) * u``.

    ``u`` is the update direction the rule wrote (0 in skipped blocks, so their parameter stays);
    ``lr_times_ratio`` is rounded to float32 first, as the kernels receive it. The caller stores
    the result in the parameter's dtype (round to nearest even).
    """
    return p - _f32(lr_times_ratio) * u


# ---- reading and committing 8-bit state (every backend does exactly this) ------------------
#
# Floor of second-moment-like states. A non-negative state (Adam's/LAMB's v, RMSprop's square
# average, Adagrad's sum: the states with an unsigned map) whose value is below half the
# smallest positive code times the block's absmax is stored as code 0, i.e. read back as 0,
# while the element's first moment can keep a nonzero code: the next step then moves it by
# lr * m / eps (18-290x lr on embedding rows absent from a batch). Its true value lies in
# [0, floor) with floor = (smallest positive code / 2) * absmax, so it is read back as that
# floor: the denominator can only be overestimated, never 0 while the block holds anything.
# Codes and the stored format are unchanged (bitsandbytes import/export as before).
#
#     read value = max(q[code] * absmax, floor)      (NaN stays NaN)
#     floor      = fl(floor_fraction * absmax),  floor_fraction = first q[i] > 0, halved
#
# Per-block commit. A block's new state values and outputs (parameter or update direction)
# are written only if all of them are finite: a non-finite gradient always makes a new state
# non-finite (every rule folds g into each state through finite coefficients, and 0 * inf is
# NaN), and so does an overflow (g * g above 3.4e38). A block that is not committed keeps its
# codes, absmax, 32-bit state and parameter; its update direction (LAMB/LARS) is written as 0.


def state_floored(rule: Rule, index: int) -> bool:
    """Whether 8-bit state ``index`` (0-based) of ``rule`` is read back with the floor."""
    return not RULE_STATES[Rule(rule)][index]


_DENORM_MIN = float(torch.finfo(torch.float32).smallest_normal) * 2.0**-23  # 2**-149


def state_floor_fraction(qmap: torch.Tensor) -> float:
    """``qmap[i] / 2`` for the first ``i`` with ``qmap[i] > 0`` (the search of the kernels: the
    first entry >= the smallest positive float32); 0.0 when there is none."""
    q = qmap.detach().float().cpu().reshape(-1)
    i = int(torch.searchsorted(q, torch.tensor([_DENORM_MIN], dtype=torch.float32))[0])
    if i >= q.numel():
        return 0.0
    return float(q[i] * torch.tensor(0.5, dtype=torch.float32))


def floor_state(values: torch.Tensor, absmax: torch.Tensor, fraction: float, block_size: int) -> torch.Tensor:
    """Apply the floor to dequantized float32 ``values`` (flat) of blocks with ``absmax``."""
    floor = (torch.tensor(fraction, dtype=torch.float32) * absmax.float()).repeat_interleave(block_size)
    floor = floor[: values.numel()]
    return torch.where(values < floor, floor, values)


def read_state(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int,
               floored: bool) -> torch.Tensor:
    """8-bit state as every backend reads it (flat float32): ``codes`` dequantized with ``absmax``
    and ``qmap``, and, where ``floored`` (:func:`state_floored`), with :func:`floor_state`'s floor."""
    values = dequantize_blockwise(codes.reshape(-1), absmax, qmap, block_size)
    if floored:
        values = floor_state(values, absmax, state_floor_fraction(qmap), block_size)
    return values


def finite_blocks(block_size: int, *tensors: torch.Tensor) -> torch.Tensor:
    """Bool per block: every value of every (flat, same-length) tensor in the block is finite."""
    n = tensors[0].numel()
    ok = torch.ones(n, dtype=torch.bool, device=tensors[0].device)
    for t in tensors:
        ok &= torch.isfinite(t.reshape(-1))
    pad = (-n) % block_size
    if pad:
        ok = torch.cat([ok, ok.new_ones(pad)])
    return ok.view(-1, block_size).all(dim=1)
