"""The stable embedding layer of the 8-bit optimizers paper (section 2.3)."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from dist8.messages import brief
from dist8.optim.config import OVERRIDE_ATTR

__all__ = ["StableEmbedding"]


class StableEmbedding(nn.Embedding):
    """Embedding with Xavier-uniform init and a LayerNorm on its output.

    Its weight is marked for 32-bit optimizer state, which every dist8
    optimizer honours (the paper keeps the embedding's state in 32 bits because
    its gradient is sparse in rows and spiky). Extra arguments go to
    :class:`torch.nn.Embedding`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        for key, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"StableEmbedding: {key} must be an int > 0, got {brief(value)}")
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)
        setattr(self.weight, OVERRIDE_ATTR, {"optim_bits": 32})

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def lookup(self, input: torch.Tensor) -> torch.Tensor:
        """The rows of ``input``'s ids (``nn.Embedding.forward``); gradient release with
        ``weight_grad_chunk`` replaces it to step the weight in chunks (dist8.optim.chunked_grads)."""
        return super().forward(input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The norm runs in its own dtype (fp32 after dist8.cast_model); the output has the
        # embedding's dtype, as in bitsandbytes, so a bf16 model stays bf16 after it.
        return self.norm(self.lookup(input).to(self.norm.weight.dtype)).to(self.weight.dtype)
