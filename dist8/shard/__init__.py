"""Sharding: the block layout and ShardedOptimizer (ZeRO-1/2 at quantization-block granularity)."""
from dist8.shard.layout import BlockLayout, ParamSlot, Piece
from dist8.shard.sharded import ShardedOptimizer

__all__ = ["BlockLayout", "ParamSlot", "Piece", "ShardedOptimizer"]
