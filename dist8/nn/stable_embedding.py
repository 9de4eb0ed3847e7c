"""Embeddings for 8-bit optimizers: the paper's stable embedding (section 2.3) and bitsandbytes' 32-bit-state Embedding."""
from __future__ import annotations

import numbers

import torch
from torch import nn

from dist8.messages import brief
from dist8.optim.manager import mark_module_attribute

__all__ = ["Embedding", "StableEmbedding"]


# The arguments both embeddings take alike (torch.nn.Embedding's, in bitsandbytes' positional order).
_SHARED_ARGS = """\
        padding_idx (int, optional): a row (negative: counted from the end) that gets no gradient
            and starts as zeros. Default None (none).
        max_norm (float, optional): rows looked up with a larger ``norm_type``-norm are rescaled to
            this norm, in ``weight`` itself. Default None (off).
        norm_type (float): the p of the p-norm for ``max_norm``. Default 2.0.
        scale_grad_by_freq (bool): divide the gradient of each row by the number of times its id
            occurs in the batch. Default False.
        sparse (bool): make ``weight.grad`` a sparse tensor. Default False; dist8 optimizers refuse
            sparse gradients.
        _weight (Tensor, optional): torch's: the initial weight, shape (num_embeddings,
            embedding_dim), used as it is (no Xavier init, no zeroed padding row; its own device
            and dtype). Default None.
"""
_FREEZE_ARG = """\
        _freeze (bool): torch's, keyword only (``nn.Embedding.from_pretrained`` passes it so; the
            positional order is bitsandbytes'): create ``weight`` with ``requires_grad=False``. Default False.
"""


class Embedding(nn.Embedding):
    __doc__ = f"""bitsandbytes' ``bnb.nn.Embedding``: :class:`torch.nn.Embedding` with Xavier-uniform init whose
    weight is marked for 32-bit optimizer state, which every dist8 optimizer honours (the recipe
    for embeddings under 8-bit optimizers, without :class:`StableEmbedding`'s LayerNorm).

    Args:
        num_embeddings (int): rows of ``weight`` (the vocabulary size), an int > 0.
        embedding_dim (int): columns of ``weight`` (the size of each vector), an int > 0.
{_SHARED_ARGS}        device: where ``weight`` is created. Default None (torch's default device).
        dtype: ``weight``'s dtype. Default None (torch's default dtype, normally float32).
{_FREEZE_ARG}    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: torch.Tensor | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 _freeze: bool = False) -> None:
        for key, value in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                raise ValueError(f"{type(self).__name__}: {key} must be an int > 0, got {brief(value)}")
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx, max_norm=max_norm,
                         norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse,
                         _weight=_weight, _freeze=_freeze, device=device, dtype=dtype)
        self._mark_weight()
        self._add_layers()

    def _add_layers(self) -> None:
        """Layers a subclass puts beside the weight, made at the end of ``__init__`` (none here)."""

    def _mark_weight(self) -> None:
        # Registered with the module: restore_module_marks (run by dist8 optimizers when built and at each
        # step) marks whatever tensor ``weight`` holds then: ``emb.weight = ...`` (tying, HF's
        # resize_token_embeddings under ZeRO-3), torch's fully_shard (DTensors). No __setattr__ hook: it
        # would put FSDP2 on its slow path (setattr instead of _parameters[...]) at every unshard.
        mark_module_attribute(self, "weight", {"optim_bits": 32})

    # The mark is an attribute of the parameter; these put in a parameter without it, or the same object
    # without its attributes, and the weight would silently get 8-bit state. Marked again at once:
    # torch.utils.swap_tensors (Module.to / to_empty / cuda on FSDP2 parameters, any parameter under
    # torch.__future__.set_swap_module_params_on_conversion) exchanges a parameter's attributes;
    # load_state_dict(assign=True) puts in a new parameter; copy.deepcopy and pickle (which call
    # __setstate__) copy a module without registering it (deepcopy: a parameter without its attributes).
    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._mark_weight()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._mark_weight()

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
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
    __doc__ = f"""Embedding with Xavier-uniform init and a LayerNorm on its output (the paper's section 2.3).

    Its weight is marked for 32-bit optimizer state, which every dist8
    optimizer honours (the paper keeps the embedding's state in 32 bits because
    its gradient is sparse in rows and spiky). The arguments are :class:`torch.nn.Embedding`'s
    in bitsandbytes' ``StableEmbedding``'s order (``_freeze``, which it lacks, is keyword only).

    Args:
        num_embeddings (int): rows of ``weight`` (the vocabulary size), an int > 0.
        embedding_dim (int): columns of ``weight`` and the LayerNorm's size, an int > 0.
{_SHARED_ARGS}        device: where ``weight`` is created; the LayerNorm (``norm``) is created on ``weight``'s
            device. Default None (torch's default device).
        dtype: ``weight``'s dtype. Default None (torch's default dtype, normally float32). The
            LayerNorm is created in torch's default dtype, not this one; it computes in its own
            dtype (fp32 after :func:`dist8.cast_model`) and its output is cast back to ``weight``'s.
{_FREEZE_ARG}    """

    def _add_layers(self) -> None:
        self.norm = nn.LayerNorm(self.embedding_dim, device=self.weight.device)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # The norm runs in its own dtype (fp32 after dist8.cast_model); the output has the
        # embedding's dtype, as in bitsandbytes, so a bf16 model stays bf16 after it.
        return self.norm(self.lookup(input).to(self.norm.weight.dtype)).to(self.weight.dtype)
