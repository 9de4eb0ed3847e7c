"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with dist8's optimizers.

dist8's optimizers take DTensor parameters directly (see :mod:`dist8.optim.dtensor`):
the update runs on local shards with the fused kernels, quantization blocks are
laid out on the global parameter, and the optimizer state dict works with
``torch.distributed.checkpoint`` at any world size. This module adds:

* :func:`fully_shard` -- ``torch.distributed.fsdp.fully_shard`` that keeps dist8's
  parameter marks (e.g. :class:`dist8.nn.StableEmbedding`'s 32-bit state), which
  are lost when FSDP2 replaces the parameters by DTensors;
* :func:`prepare` -- restores those marks on an already wrapped model and refuses
  FSDP1 (``FullyShardedDataParallel``) models with a clear message;
* :func:`save_dcp` / :func:`load_dcp` -- model + optimizer checkpoints with
  ``torch.distributed.checkpoint``; optimizer state is stored as uint8 codes (sharded
  like the parameter) and fp32 absmax (one full copy), never as fp32 moments.

Typical use::

    from dist8.integrations import fsdp
    for block in model.blocks:
        fsdp.fully_shard(block, mp_policy=policy)
    fsdp.fully_shard(model, mp_policy=policy)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=3e-4)
    ...
    fsdp.save_dcp("ckpt/step100", model, opt)
    fsdp.load_dcp("ckpt/step100", model, opt)   # any world size
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dist8.optim.config import OVERRIDE_ATTR

__all__ = ["fully_shard", "prepare", "save_dcp", "load_dcp", "check_not_fsdp1"]

_FSDP1_MSG = (
    "{what} is wrapped with FSDP1 (FullyShardedDataParallel, flat parameters), which dist8 optimizers do not "
    "support: wrap the model with torch.distributed.fsdp.fully_shard (FSDP2) or use dist8.ShardedOptimizer instead"
)


def check_not_fsdp1(model: nn.Module) -> None:
    """Raise ``TypeError`` if ``model`` (or a submodule) is an FSDP1 ``FullyShardedDataParallel``."""
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            raise TypeError(_FSDP1_MSG.format(what=f"module {name or '<root>'!r}"))
    for name, p in model.named_parameters():
        if type(p).__name__ == "FlatParameter" or getattr(p, "_fsdp_flattened", False):
            raise TypeError(_FSDP1_MSG.format(what=f"parameter {name!r}"))


def _marks(module: nn.Module) -> dict[str, dict]:
    return {n: dict(getattr(p, OVERRIDE_ATTR)) for n, p in module.named_parameters()
            if getattr(p, OVERRIDE_ATTR, None)}


def _restore(module: nn.Module, marks: dict[str, dict]) -> None:
    params = dict(module.named_parameters())
    for name, mark in marks.items():
        if name in params:
            setattr(params[name], OVERRIDE_ATTR, dict(mark))


def prepare(model: nn.Module) -> nn.Module:
    """Make a ``fully_shard``-wrapped model ready for a dist8 optimizer; returns ``model``.

    Refuses FSDP1 models, and re-marks the weights of :class:`dist8.nn.StableEmbedding`
    modules for 32-bit state (FSDP2 replaces parameters, dropping the mark). Call it
    after ``fully_shard`` and before creating the optimizer; :func:`fully_shard` does
    both for you.
    """
    from dist8.nn import StableEmbedding

    check_not_fsdp1(model)
    for module in model.modules():
        if isinstance(module, StableEmbedding) and getattr(module.weight, OVERRIDE_ATTR, None) is None:
            setattr(module.weight, OVERRIDE_ATTR, {"optim_bits": 32})
    return model


def fully_shard(module: nn.Module, **kwargs: Any):
    """``torch.distributed.fsdp.fully_shard(module, **kwargs)`` keeping dist8's parameter marks."""
    from torch.distributed.fsdp import fully_shard as _fully_shard

    check_not_fsdp1(module)
    marks = _marks(module)
    out = _fully_shard(module, **kwargs)
    _restore(module, marks)
    return out


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, options=None):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=options)


def save_dcp(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, extra: dict | None = None,
             process_group=None, options=None) -> None:
    """Save model and optimizer with ``torch.distributed.checkpoint.save`` (collective).

    The optimizer part holds, per parameter, ``state1``/``state2`` (uint8 codes, or
    fp32 for 32-bit state) as DTensors sharded like the parameter, ``absmax1``/
    ``absmax2`` as one full-length fp32 tensor, and ``step``. ``extra`` (e.g.
    ``{"step": 100}``) is stored too.
    """
    import torch.distributed.checkpoint as dcp

    msd, osd = _state_dicts(model, optimizer, options)
    state = {"model": msd, "optim": osd}
    if extra:
        state["extra"] = dict(extra)
    dcp.save(state, checkpoint_id=path, process_group=process_group)


def load_dcp(path: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, extra: dict | None = None,
             process_group=None, options=None) -> dict | None:
    """Load what :func:`save_dcp` wrote, at any world size (collective); returns ``extra`` if given.

    Pass ``extra`` with the same keys as at save (values are placeholders) to read it back.
    Nothing is unpickled but DCP's own metadata classes: ``.metadata`` is checked against an
    allowlist before DCP opens it, and tensors and byte items load with ``weights_only=True``.
    """
    import os

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    from dist8.checkpoint.torch_files import check_dcp_metadata, weights_only_loads

    msd, osd = _state_dicts(model, optimizer, options)  # also creates the optimizer state to load into
    state = {"model": msd, "optim": osd}
    if extra:
        state["extra"] = dict(extra)
    check_dcp_metadata(os.path.join(path, ".metadata"))
    with weights_only_loads():
        dcp.load(state, checkpoint_id=path, process_group=process_group)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    return state.get("extra")
