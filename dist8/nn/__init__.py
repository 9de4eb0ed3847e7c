"""Layers that go with 8-bit optimizers."""
from dist8.nn.stable_embedding import StableEmbedding

__all__ = ["StableEmbedding"]
