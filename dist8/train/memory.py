"""Per-rank memory breakdown of a training run, from tensor accounting (no allocator, no estimate).

What this rank holds, in bytes, counted from the tensors themselves (``numel * element_size``
of local shards):

``params``           the model's parameters (the local shard under FSDP2)
``grads``            the gradients a step holds at once: one per parameter (the flat buffers of
                     ``ShardedOptimizer`` stage 2), or only the largest parameter's under
                     gradient release (each is freed as soon as its parameter stepped; with
                     ``weight_grad_chunk`` a chunked Linear/Embedding weight counts one chunk)
``correction``       the master-weight correction (``master_weight_bits``), stored as optimizer state
``master``           fp32 master copies (``ShardedOptimizer``'s owned range for bf16/fp16 parameters)
``optimizer_state``  the rest of the optimizer state (codes, absmax, 32-bit state, histories)
``fp32_adamw``       what unsharded fp32 torch AdamW needs for the same model: 16 bytes per
                     parameter (4 param + 4 grad + 8 moments), for comparison

bench/memory.py measures the same systems with the allocator (activations and temporaries included).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist8.optim.state_schema import CORRECTION

__all__ = ["MEMORY_PARTS", "memory_breakdown"]

MEMORY_PARTS = ("params", "grads", "correction", "master", "optimizer_state")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def _state_dicts(optimizer: Any) -> list[dict]:
    inner = getattr(optimizer, "inner", None)  # ShardedOptimizer
    if inner is None and not hasattr(optimizer, "state"):
        inner = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO wrapper
    state = getattr(inner if inner is not None else optimizer, "state", {})
    return list(state.values()) if isinstance(state, dict) else []


def memory_breakdown(model: nn.Module, optimizer: Any, *, gradient_release: Any = False) -> dict[str, int]:
    """Bytes this rank holds for ``model`` trained by ``optimizer`` (see the module docstring).

    ``gradient_release``: False, True, or the :class:`dist8.optim.release.GradientRelease` handle
    (with ``weight_grad_chunk``, a chunked Linear/Embedding weight counts one chunk of its gradient).
    """
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    if getattr(optimizer, "grad_buffers", None) is not None:  # ShardedOptimizer stage 2: flat buffers
        grads = optimizer.grad_buffer_nbytes()
    elif gradient_release:
        chunks = getattr(gradient_release, "chunks", None)
        grads = max((_nbytes(p) if chunks is None else chunks.grad_numel(p) * p.element_size() for p in trainable),
                    default=0)
    else:
        grads = sum(_nbytes(p) for p in trainable)
    correction = state = 0
    for st in _state_dicts(optimizer):
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                if key == CORRECTION:
                    correction += _nbytes(v)
                else:
                    state += _nbytes(v)
    master = optimizer.master_nbytes() if hasattr(optimizer, "master_nbytes") else 0
    n_params = sum(p.numel() for p in params)  # global (a DTensor's numel is global)
    return {"params": sum(_nbytes(p) for p in params), "grads": grads, "correction": correction, "master": master,
            "optimizer_state": state, "fp32_adamw": 16 * n_params}
