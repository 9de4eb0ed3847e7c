"""Embeddings for 8-bit optimizers: the paper's stable embedding (section 2.3) and bitsandbytes' 32-bit-state Embedding."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from dist8.messages import brief
from dist8.optim.config import OVERRIDE_ATTR

__all__ = ["Embedding", "StableEmbedding"]


class Embedding(nn.Embedding):
    """bitsandbytes' ``bnb.nn.Embedding``: :class:`torch.nn.Embedding` with Xavier-uniform init whose
    weight is marked for 32-bit optimizer state, which every dist8 optimizer honours (the recipe
    for embeddings under 8-bit optimizers, without :class:`StableEmbedding`'s LayerNorm). Arguments
    are :class:`torch.nn.Embedding`'s: ``num_embeddings`` and ``embedding_dim`` (ints > 0), then
    ``padding_idx``, ``max_norm``, ... .
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        for key, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {key} must be an int > 0, got {brief(value)}")
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self._mark_weight()

    def _mark_weight(self) -> None:
        if isinstance(self.weight, torch.Tensor) and getattr(self.weight, OVERRIDE_ATTR, None) is None:
            setattr(self.weight, OVERRIDE_ATTR, {"optim_bits": 32})

    # The mark is an attribute of the parameter, and torch.utils.swap_tensors exchanges a parameter's
    # attributes with its new contents: Module.to / to_empty / cuda on FSDP2 (DTensor) parameters always
    # swap (meta-device init), other parameters under torch.__future__.set_swap_module_params_on_conversion;
    # load_state_dict(assign=True) puts in a new parameter. The weight would silently get 8-bit state.
    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._mark_weight()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mark_weight()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def lookup(self, input: torch.Tensor) -> torch.Tensor:
        """The rows of ``input``'s ids (``nn.Embedding.forward``); gradient release with
        ``weight_grad_chunk`` replaces it to step the weight in chunks (dist8.optim.chunked_grads)."""
        return nn.Embedding.forward(self, input)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.lookup(input)


class StableEmbedding(Embedding):
    """Embedding with Xavier-uniform init and a LayerNorm on its output (the paper's section 2.3).

    Its weight is marked for 32-bit optimizer state, which every dist8
    optimizer honours (the paper keeps the embedding's state in 32 bits because
    its gradient is sparse in rows and spiky). Extra arguments go to
    :class:`torch.nn.Embedding`.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, *args, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, *args, **kwargs)
        self.norm = nn.LayerNorm(embedding_dim, device=self.weight.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The norm runs in its own dtype (fp32 after dist8.cast_model); the output has the
        # embedding's dtype, as in bitsandbytes, so a bf16 model stays bf16 after it.
        return self.norm(self.lookup(input).to(self.norm.weight.dtype)).to(self.weight.dtype)
