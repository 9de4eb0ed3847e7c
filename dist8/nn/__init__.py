"""Layers that go with 8-bit optimizers."""
from dist8.nn.cast import NORM_LAYERS, cast_model, is_kept_fp32, is_norm_layer
from dist8.nn.stable_embedding import Embedding, StableEmbedding

__all__ = ["NORM_LAYERS", "Embedding", "StableEmbedding", "cast_model", "is_kept_fp32", "is_norm_layer"]
