"""Quantization maps and block-wise quantize/dequantize (the bottom layer of dist8)."""
import torch as _torch

from dist8.version import check_torch_version

check_torch_version(_torch.__version__)  # the bottom layer: every path to torch code passes here first

from dist8.quant.blockwise import (
    DEFAULT_BLOCK_SIZE,
    MAX_BLOCK_SIZE,
    block_reciprocal,
    check_block_size,
    dequantize_blockwise,
    effective_block_size,
    nearest_code,
    num_blocks,
    quantize_blockwise,
)
from dist8.quant.maps import MAP_NAMES, create_dynamic_map, dynamic_map, fp8_map, get_map, linear_map
from dist8.quant.master import MASTER_WEIGHT_BITS, check_master_weight_bits, decode_master, encode_master

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "MAP_NAMES",
    "MAX_BLOCK_SIZE",
    "MASTER_WEIGHT_BITS",
    "check_master_weight_bits",
    "decode_master",
    "encode_master",
    "block_reciprocal",
    "check_block_size",
    "create_dynamic_map",
    "dequantize_blockwise",
    "dynamic_map",
    "effective_block_size",
    "fp8_map",
    "get_map",
    "linear_map",
    "nearest_code",
    "num_blocks",
    "quantize_blockwise",
]
