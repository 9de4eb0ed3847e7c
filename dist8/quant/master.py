"""Master weights in 24 or 32 bits: a bf16/fp16 parameter plus an int8/int16 correction.

This module is the *specification* (pure torch, exact) that the fused kernels
will mirror bit for bit; FlashOptim calls the option ``master_weight_bits``.

Notation for a parameter dtype N with ``t`` fraction bits and smallest normal
exponent ``emin`` (bf16: t=7, emin=-126; fp16: t=10, emin=-14), a correction of
``b`` bits (24-bit master: b=8, int8; 32-bit master: b=16, int16) and
``Q = 2**(b-1)``:

* ``E(p)`` is the exponent of the parameter value ``p``: ``floor(log2|p|)`` for
  normal ``p``, ``emin`` for zero and subnormals. Read from the bits:
  ``max(biased_exponent_field, 1) - bias``.
* ``shift = min(t + b, 24)`` and the correction unit is ``u(p) = 2**(E(p) - shift)``.
  (24 = fp32's significand: a finer unit than fp32 can hold buys nothing, and
  with this cap fp16 + int16 reconstructs every fp32 master in fp16's normal range exactly.)

``encode(m)`` of an fp32 master value ``m``:

1. ``p = N(m)``, round to nearest even; a finite ``m`` beyond N's largest finite
   value saturates to ``±max`` (the parameter stays finite); inf/NaN pass through.
2. ``e = m - p`` in fp32 (exact: Sterbenz, ``p`` and ``m`` are within a factor 2).
3. ``r = ldexp(e, -(E(p) - shift))`` (exact: scaling by a power of two; kernels
   must not form ``2**(shift - E(p))`` as one fp32 constant, which overflows for bf16).
4. ``c = clamp(round_half_even(r), -Q, Q - 1)``; ``c = 0`` for non-finite ``m``.

``decode(p, c) = p`` if ``c == 0`` (keeps -0.0, inf, NaN) else
``fp32(p + ldexp(c, E(p) - shift))``: one correctly rounded fp32 addition of two
exact operands (an FMA gives the same result, ``c * u`` being exact).

Error bound (what the optimizers rely on), for finite ``|m| <= max(N)``::

    |decode(encode(m)) - m| <= u(p) = 2**(E(p) - min(t + b, 24))

and ``<= u(p) / 2`` unless ``c`` was clamped at ``Q - 1`` (``m`` within half a
unit of the midpoint above ``p``). Since ``|e| <= ulp(p) / 2 = 2**(E(p) - t - 1)``,
``r`` lies in ``[-2**(shift - t - 1), 2**(shift - t - 1)] ⊆ [-Q, Q]``: nothing else
clamps, and decode adds no rounding for encoded pairs. Relative to ``|m|`` for
normal ``p`` (``|m| >= 2**E(p) * (1 - 2**-(t+1))``; the half-spacing below ``p = 2**emin``
is the subnormal one, elsewhere below a power of two it is ``2**-(t+2)``):

=================  =========  ===========================  =======================
parameter          master     relative bound               plain N rounding
=================  =========  ===========================  =======================
bf16 + int8        24-bit     2**-15 * 1.004 (3.1e-5)      2**-8 (3.9e-3)
fp16 + int8        24-bit     2**-18 * 1.0005 (3.8e-6)     2**-11 (4.9e-4)
bf16 + int16       32-bit     2**-23 * 1.004 (1.2e-7)      2**-8
fp16 + int16       32-bit     exact (bitwise) in fp16's    2**-11
                              normal range
=================  =========  ===========================  =======================

So a "24-bit" bf16 master carries 16 significant bits (8 of bf16 + 8 of
correction), not fp32's 24; its absolute error is ``u(p)``, which for zero and
subnormal ``p`` is the fixed ``2**(emin - shift)`` (masters far below N's
normal range keep only that absolute precision). An update smaller than
``u(p)/2`` is lost, as an fp32 update smaller than half an fp32 ulp is.

The correction is elementwise (no per-block scale), so any sharding of it is
exact; it is stored like optimizer state (``"correction"``, int8/int16, the
parameter's shape).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dist8.messages import brief

__all__ = [
    "MASTER_WEIGHT_BITS",
    "MasterFormat",
    "check_master_weight_bits",
    "correction_unit",
    "decode_master",
    "encode_master",
    "encode_master_exact",
    "exponent_of",
    "master_format",
]

MASTER_WEIGHT_BITS = (24, 32)


@dataclass(frozen=True)
class MasterFormat:
    """The constants of one (parameter dtype, master bits) pair (see the module docstring)."""

    param_dtype: torch.dtype
    correction_dtype: torch.dtype
    fraction_bits: int  # t
    min_exponent: int  # emin
    exponent_bias: int
    correction_bits: int  # b
    shift: int  # min(t + b, 24): the unit is 2**(E(p) - shift)

    @property
    def q(self) -> int:
        """``2**(b-1)``: corrections lie in ``[-q, q - 1]``."""
        return 1 << (self.correction_bits - 1)

    @property
    def max_finite(self) -> float:
        return torch.finfo(self.param_dtype).max


_PARAM_DTYPES = {torch.bfloat16: (7, -126, 127), torch.float16: (10, -14, 15)}


def master_format(param_dtype: torch.dtype, master_weight_bits: int) -> MasterFormat:
    """Constants for ``param_dtype`` (bf16 or fp16) and ``master_weight_bits`` (24 or 32)."""
    check_master_weight_bits(master_weight_bits, param_dtype)
    t, emin, bias = _PARAM_DTYPES[param_dtype]
    b = master_weight_bits - 16
    return MasterFormat(param_dtype, torch.int8 if b == 8 else torch.int16, t, emin, bias, b, min(t + b, 24))


def check_master_weight_bits(master_weight_bits: int | None, param_dtype: torch.dtype, name: str = "parameter") -> None:
    """Raise a one-line error naming ``name`` unless ``master_weight_bits`` applies to ``param_dtype``.

    ``None`` is always valid (no correction). 24 and 32 need a bf16/fp16 parameter:
    an fp32 parameter is its own master.
    """
    if master_weight_bits is None:
        return
    if (isinstance(master_weight_bits, bool) or not isinstance(master_weight_bits, int)
            or master_weight_bits not in MASTER_WEIGHT_BITS):
        raise ValueError(f"master_weight_bits must be None, 24 or 32 ({name}), got {brief(master_weight_bits)}")
    if param_dtype not in _PARAM_DTYPES:
        raise ValueError(
            f"master_weight_bits={master_weight_bits} needs a bfloat16 or float16 parameter, but {name} is "
            f"{param_dtype}; an fp32 parameter is its own master (use master_weight_bits=None)"
        )


def exponent_of(param: torch.Tensor, fmt: MasterFormat) -> torch.Tensor:
    """``E(p)`` (int32) from the bits: ``max(biased exponent, 1) - bias`` (zero and subnormals: ``emin``)."""
    if param.dtype != fmt.param_dtype:
        raise TypeError(f"parameter dtype {param.dtype} does not match the format's {fmt.param_dtype}")
    bits = param.view(torch.int16).to(torch.int32) & 0x7FFF
    field = bits >> fmt.fraction_bits
    return field.clamp(min=1) - fmt.exponent_bias


def correction_unit(param: torch.Tensor, fmt: MasterFormat) -> torch.Tensor:
    """``u(p) = 2**(E(p) - shift)`` as float64 (exact): the correction's unit and the error bound."""
    return torch.exp2((exponent_of(param, fmt) - fmt.shift).to(torch.float64))


def encode_master(master: torch.Tensor, param_dtype: torch.dtype, master_weight_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(param, correction)`` of fp32 ``master`` (see the module docstring for the exact rule)."""
    if master.dtype != torch.float32:
        raise TypeError(f"master must be float32, got {master.dtype}")
    fmt = master_format(param_dtype, master_weight_bits)
    finite = torch.isfinite(master)
    # Saturate finite values beyond the parameter's range; inf/NaN pass through unchanged.
    clamped = torch.where(finite, master.clamp(-fmt.max_finite, fmt.max_finite), master)
    param = clamped.to(param_dtype)
    # float64 makes every step exact, so this equals the fp32 kernel steps (each exact, see above).
    scaled = (master.double() - param.double()) * correction_unit(param, fmt).reciprocal()
    scaled = torch.where(finite, scaled, torch.zeros_like(scaled))
    correction = torch.round(scaled).clamp(-fmt.q, fmt.q - 1).to(fmt.correction_dtype)
    return param, correction


def decode_master(param: torch.Tensor, correction: torch.Tensor, master_weight_bits: int | None = None) -> torch.Tensor:
    """The fp32 master value of ``(param, correction)``: ``fp32(p + c * u(p))``, and ``p`` where ``c == 0``."""
    bits = master_weight_bits if master_weight_bits is not None else (24 if correction.dtype == torch.int8 else 32)
    fmt = master_format(param.dtype, bits)
    if correction.dtype != fmt.correction_dtype or correction.shape != param.shape:
        raise ValueError(
            f"correction must be {fmt.correction_dtype} with the parameter's shape {tuple(param.shape)}, got "
            f"{correction.dtype} {tuple(correction.shape)}"
        )
    exact = param.double() + correction.double() * correction_unit(param, fmt)  # exact in float64
    return torch.where(correction == 0, param.float(), exact.float())  # one rounding to fp32


def encode_master_exact(master: torch.Tensor, param_dtype: torch.dtype, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`encode_master`, but exact for every value a (param, correction) pair decodes to.

    ``encode_master`` rounds the parameter to nearest-even. A pair with correction ``-Q`` decodes to the
    midpoint below its parameter; re-encoding that midpoint can pick the lower, even neighbour, whose
    correction ``+Q`` clamps to ``Q - 1`` (one unit lost, within the documented bound). Where that happens
    the upper neighbour with ``-Q`` is taken instead, so exported fp32 masters load back bit for bit.
    """
    param, correction = encode_master(master, param_dtype, bits)
    fmt = master_format(param_dtype, bits)
    lost = (correction == fmt.q - 1) & (decode_master(param, correction, bits) != master)
    if bool(lost.any()):
        # a clamped +Q means the master lies above the parameter: the neighbour toward +inf
        up = torch.nextafter(param[lost], torch.full_like(param[lost], float("inf")))
        up_correction = torch.round((master[lost].double() - up.double()) / correction_unit(up, fmt))
        ok = (up_correction >= -fmt.q) & (up_correction < fmt.q)
        up_correction = up_correction.clamp(-fmt.q, fmt.q - 1).to(fmt.correction_dtype)
        ok &= decode_master(up, up_correction, bits) == master[lost]
        idx = lost.nonzero(as_tuple=True)
        sel = tuple(i[ok] for i in idx)
        param[sel] = up[ok]
        correction[sel] = up_correction[ok]
    return param, correction
