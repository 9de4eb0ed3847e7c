"""Layers that go with 8-bit optimizers."""
from dist8.nn.cast import NORM_LAYERS, cast_model
from dist8.nn.stable_embedding import StableEmbedding

__all__ = ["NORM_LAYERS", "StableEmbedding", "cast_model"]
