"""Quantization maps and block-wise quantize/dequantize (the bottom layer of dist8)."""
from dist8.quant.blockwise import (
    DEFAULT_BLOCK_SIZE,
    block_reciprocal,
    check_block_size,
    dequantize_blockwise,
    effective_block_size,
    nearest_code,
    num_blocks,
    quantize_blockwise,
)
from dist8.quant.maps import MAP_NAMES, dynamic_map, get_map, linear_map

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAP_NAMES",
    "block_reciprocal",
    "check_block_size",
    "dequantize_blockwise",
    "dynamic_map",
    "effective_block_size",
    "get_map",
    "linear_map",
    "nearest_code",
    "num_blocks",
    "quantize_blockwise",
]
