"""Block-wise quantization: one fp32 absmax per block of ``block_size`` values.

Every value is normalised by multiplying it with the float32 reciprocal of its
block's absmax (one division per block, as bitsandbytes does; see
:func:`block_reciprocal`) and mapped to the *exact* nearest code of the map
(ties go to the code of smaller magnitude). The
reference here is plain torch; the C++ and CUDA kernels mirror it bit for bit.
"""
from __future__ import annotations

import torch

__all__ = [
    "quantize_blockwise", "dequantize_blockwise", "nearest_code", "num_blocks", "check_block_size", "block_reciprocal",
    "effective_block_size", "DEFAULT_BLOCK_SIZE", "MAX_BLOCK_SIZE",
]

DEFAULT_BLOCK_SIZE = 256
#: The largest ``block_size`` an optimizer takes (``block_wise=False``, one block per parameter, is not bound
#: by it): a block of 2**30 values was accepted and the first step died in the kernel's per-thread buffer
#: (std::bad_alloc, naming nothing).
MAX_BLOCK_SIZE = 1 << 16

# Smallest normal float32: a block whose absmax is below it (zero, subnormal) or NaN is
# normalised by 1, so its reciprocal never overflows.
_FLT_MIN = torch.finfo(torch.float32).tiny


def check_block_size(block_size: int, name: str = "block_size", largest: int | None = None) -> int:
    """Validate a block size: a power of two, at least 64 and (if given) at most ``largest``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int, got {type(block_size).__name__}")
    if block_size < 64 or block_size & (block_size - 1):
        raise ValueError(f"{name} must be a power of two >= 64, got {block_size}")
    if largest is not None and block_size > largest:
        raise ValueError(f"{name} must be a power of two in [64, {largest}], got {block_size}: the kernels hold a "
                         "block's values in a buffer per thread (bitsandbytes' largest block is 4096)")
    return block_size


def effective_block_size(block_size: int, block_wise: bool, numel: int) -> int:
    """The quantization block of a parameter of ``numel`` elements (of the whole, unsharded parameter).

    ``block_wise=True``: ``block_size`` (validated). ``block_wise=False`` (the paper's ablation,
    one absmax per parameter): the smallest power of two >= ``numel``, at least 64, so the
    whole parameter is one block. Every layer asks this function; none recomputes it.
    """
    check_block_size(block_size)
    if block_wise:
        return block_size
    return max(64, 1 << max(numel - 1, 1).bit_length())


def num_blocks(numel: int, block_size: int) -> int:
    """Number of blocks covering ``numel`` values (the last one may be partial)."""
    return (numel + block_size - 1) // block_size


def nearest_code(x: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the exact nearest entry of sorted ``qmap`` for each float32 value of ``x``.

    ``hi`` is the first code >= x, ``lo`` the one before it; distances are
    computed in float32 as ``x - lo`` and ``hi - x`` and ties pick the code of
    smaller magnitude (towards zero). The kernels implement exactly this.
    """
    hi = torch.searchsorted(qmap, x).clamp_(max=qmap.numel() - 1)
    lo = (hi - 1).clamp_(min=0)
    q_lo, q_hi = qmap[lo], qmap[hi]
    d_lo, d_hi = x - q_lo, q_hi - x
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (q_lo.abs() <= q_hi.abs()))
    return torch.where(take_lo, lo, hi)


def block_reciprocal(absmax: torch.Tensor) -> torch.Tensor:
    """Factor (float32) each block's values are multiplied by before the code search.

    ``1 / absmax`` rounded to float32 where ``absmax`` is a normal float, else 1
    (all-zero, subnormal and NaN blocks: their values then map to the code
    nearest 0, or NaN's code 255). An infinite absmax gives 0.
    """
    absmax = absmax.float()
    ok = absmax >= _FLT_MIN
    return torch.where(ok, 1.0 / torch.where(ok, absmax, torch.ones_like(absmax)), torch.ones_like(absmax))


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % block_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size)


def quantize_blockwise(
    x: torch.Tensor, qmap: torch.Tensor, block_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` (any shape, any float dtype) block-wise.

    Returns ``(codes, absmax)``: uint8 codes with the shape of ``x`` and float32
    absmax of shape ``[ceil(numel / block_size)]``. Blocks run over the flattened
    tensor; the last one may be partial. An all-zero block has absmax 0 and all
    its values map to the code of 0.
    """
    check_block_size(block_size)
    if qmap.dtype != torch.float32 or qmap.numel() != 256:
        raise ValueError(f"qmap must be float32 with 256 entries, got {qmap.dtype} with {qmap.numel()}")
    blocks = _blocks(x, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalised = blocks * block_reciprocal(absmax)[:, None]
    codes = nearest_code(normalised, qmap.to(x.device)).to(torch.uint8)
    return codes.view(-1)[: x.numel()].view(x.shape), absmax


def dequantize_blockwise(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    qmap: torch.Tensor,
    block_size: int = 256,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`: a tensor with the shape of ``codes``.

    ``out_dtype`` (default float32): the dtype returned, e.g. that of the tensor that
    was quantized (bitsandbytes returns its input's dtype); the values are computed
    in float32 and rounded once.
    """
    check_block_size(block_size)
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise TypeError(f"out_dtype must be a floating torch.dtype, got {out_dtype!r}")
    n = codes.numel()
    if absmax.numel() != num_blocks(n, block_size):
        raise ValueError(
            f"absmax has {absmax.numel()} entries but {n} codes in blocks of {block_size} need "
            f"{num_blocks(n, block_size)}"
        )
    values = qmap.to(codes.device)[codes.reshape(-1).long()]
    scale = absmax.float().repeat_interleave(block_size)[:n]
    return (values * scale).view(codes.shape).to(out_dtype)
