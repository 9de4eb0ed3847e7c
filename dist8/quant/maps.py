"""Quantization maps: the 256 float32 values an 8-bit code can stand for.

The dynamic tree map (Dettmers 2016; used by the 8-bit optimizers paper) spends
its bits on a variable exponent (a run of zeros ended by an indicator bit) and a
linear fraction, so it covers magnitudes 1e-7..1 with relative error that stays
roughly constant. ``signed=False`` reuses the sign bit as one more fraction bit
and is meant for non-negative state (Adam's second moment).

The fp8 map is a small-float grid whose code follows from a value's float32 bits
(round the mantissa, rebias the exponent) instead of a search of 256 entries, so a
CPU without in-register 256-entry lookups (AVX2) quantizes and dequantizes without
table loads. Every layer still treats it as a sorted 256-entry map.
"""
from __future__ import annotations

import functools

import torch

from dist8.messages import brief

__all__ = ["create_dynamic_map", "dynamic_map", "linear_map", "fp8_map", "get_map", "MAP_NAMES"]

MAP_NAMES = ("dynamic", "linear", "fp8")


@functools.lru_cache(maxsize=None)
def _dynamic_map_cached(signed: bool, max_exponent_bits: int) -> torch.Tensor:
    values: list[float] = []
    non_sign_bits = 7
    for exponent in range(max_exponent_bits):
        # Each step towards larger magnitudes frees one more fraction bit (a fractional count,
        # with max_exponent_bits=8 at exponent 0, means no values at that exponent).
        n_fraction = int(2 ** (exponent + non_sign_bits - max_exponent_bits + (0 if signed else 1)))
        values += _run(n_fraction, 10 ** (exponent - (max_exponent_bits - 1)), signed)
    # Fewer exponent bits than 7 leave codes over: one more linear run at the top exponent
    # (bitsandbytes does the same, so every max_exponent_bits gives its map value for value).
    spare = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if spare > 0:
        values += _run(spare, 1.0, signed)
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def _run(count: int, scale: float, signed: bool) -> list[float]:
    """``count`` centres of equal steps over [0.1, 1], times ``scale`` (and their negatives)."""
    if count < 1:
        return []
    edges = torch.linspace(0.1, 1, count + 1, dtype=torch.float32)
    centres = (edges[:-1] + edges[1:]) / 2.0
    return (scale * centres).tolist() + ((-scale * centres).tolist() if signed else [])


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7) -> torch.Tensor:
    """The 8-bit dynamic tree map as a sorted float32 tensor of 256 values in [-1, 1].

    Args:
        signed: True for signed state (first moments, momentum); False for the
            unsigned variant used for non-negative state (second moments).
        max_exponent_bits: largest number of exponent bits, 1..7 (default 7, as in
            the paper); 8 for the signed map (no fraction bit at the smallest exponent).

    Equals ``bitsandbytes.functional.create_dynamic_map(signed, max_exponent_bits)``
    value for value.
    """
    if isinstance(max_exponent_bits, bool) or not isinstance(max_exponent_bits, int):
        raise TypeError(f"max_exponent_bits must be an int, got {type(max_exponent_bits).__name__}")
    top = 8 if signed else 7  # unsigned maps use the sign bit as a fraction bit: 8 would need 257 codes
    if not 1 <= max_exponent_bits <= top:
        raise ValueError(
            f"max_exponent_bits must be in 1..{top} for a {'signed' if signed else 'unsigned'} map, got {max_exponent_bits}"
        )
    return _dynamic_map_cached(bool(signed), int(max_exponent_bits)).clone()


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """bitsandbytes' name and signature for :func:`dynamic_map` (``total_bits`` must be 8)."""
    if total_bits != 8:
        raise ValueError(f"total_bits must be 8 (dist8 state is 8-bit), got {total_bits}")
    return dynamic_map(signed, max_exponent_bits)


def linear_map(signed: bool = True) -> torch.Tensor:
    """Evenly spaced 8-bit map (the paper's 'linear quantization' ablation), sorted float32[256].

    Signed: 255 values evenly spaced in [-1, 1] (zero included) plus a duplicate
    of 1.0 so there are 256 entries; unsigned: 256 values evenly spaced in [0, 1].
    """
    if signed:
        values = torch.arange(-127, 128, dtype=torch.float32) / 127.0
        return torch.cat([values, values[-1:]])
    return torch.arange(256, dtype=torch.float32) / 255.0


# The fp8 grids: (exponent bias, number of magnitudes). A magnitude k (0..count-1) has
# exponent field e = k >> 3 and 3 mantissa bits m = k & 7; e = 0 are subnormals.
_FP8_SIGNED = (15, 129)     # e4m3: k = 120 is 1.0, the largest code a normalised value needs
_FP8_UNSIGNED = (31, 256)   # e5m3: k = 248 is 1.0; 2^-33 .. 1 (3 mantissa bits on v ~ 4 on sqrt(v))


def _fp8_magnitudes(bias: int, count: int) -> torch.Tensor:
    k = torch.arange(count, dtype=torch.float64)
    e, m = torch.div(k, 8, rounding_mode="floor"), torch.remainder(k, 8)
    normal = torch.exp2(e - bias) * (1 + m / 8)
    subnormal = m * 2.0 ** (1 - bias - 3)
    return torch.where(e > 0, normal, subnormal).float()  # every value is exact in float32


@functools.lru_cache(maxsize=None)
def _fp8_map_cached(signed: bool) -> torch.Tensor:
    if signed:
        mag = _fp8_magnitudes(*_FP8_SIGNED)
        # Negatives use magnitudes 1..128 and positives 0..127, so 0 appears once and the map is
        # strictly increasing: code = 128 + k for +k, 128 - k for -k.
        return torch.cat([-mag[1:].flip(0), mag[:128]])
    return _fp8_magnitudes(*_FP8_UNSIGNED)


def fp8_map(signed: bool = True) -> torch.Tensor:
    """An FP8-like 8-bit map as a sorted float32 tensor of 256 values (``quant_map="fp8"``).

    Args:
        signed: True (first moments, momentum): sign and an e4m3 magnitude with
            subnormals, exponent bias 15, so values run 2^-17 .. 1 (plus the unused
            codes above 1: -2.0 .. 1.875 in all); code ``128 + k`` is ``+mag(k)`` and
            ``128 - k`` is ``-mag(k)``. False (second moments): an unsigned e5m3
            magnitude with subnormals, bias 31: 2^-33 .. 1 (1.875 at code 255).

    Where ``mag(k) = 2^(e - bias) * (1 + m / 8)`` for ``e = k >> 3 > 0``, ``m = k & 7``,
    and ``m * 2^(-bias - 2)`` for ``e = 0``. Codes are the exact nearest entry with
    dist8's tie rule, like every map; the CPU kernels compute them from the float
    bits instead of searching (bit-identical; checked when the map is first used).
    Not a bitsandbytes map: a checkpoint with it converts to bitsandbytes only
    through dequantized state.
    """
    return _fp8_map_cached(bool(signed)).clone()


def get_map(name: str, signed: bool) -> torch.Tensor:
    """Map by name: one of :data:`MAP_NAMES` (``"dynamic"``, ``"linear"``, ``"fp8"``)."""
    if isinstance(name, str):
        if name == "dynamic":
            return dynamic_map(signed)
        if name == "linear":
            return linear_map(signed)
        if name == "fp8":
            return fp8_map(signed)
    raise ValueError(f"quant_map must be one of {MAP_NAMES}, got {brief(name)}")
