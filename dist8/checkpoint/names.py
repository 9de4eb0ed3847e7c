"""Checkpoint names of a model's parameters and tensors: without the wrappers around the model.

``torch.compile(model)`` names every parameter ``_orig_mod.<name>``, ``DistributedDataParallel``
``module.<name>``, activation checkpointing's wrapper ``..._checkpoint_wrapped_module.<name>``.
A checkpoint keyed by those names loads only into the same wrapping: saved under DDP on 4
ranks, it would not load on 1 rank without DDP, and under FSDP2 the wrapped names did not even
match torch's full state dicts (whose names drop the wrappers), so a compiled FSDP2 model was
saved without its optimizer state. dist8 checkpoints use the names torch's distributed
checkpointing uses: the wrappers' own components are left out, whatever the wrapping at save
and at load.

Checkpoints written before this (names with the wrappers' components) still load into a model
wrapped the same way: :func:`dist8.checkpoint.load` falls back to the wrapped names when those,
and not the plain ones, are the checkpoint's.
"""
from __future__ import annotations

import torch

__all__ = ["WRAPPER_ATTRIBUTES", "parameter_names", "state_dict_by_name"]

# Attributes by which torch's wrappers hold the module they wrap: torch.compile's OptimizedModule,
# the activation checkpoint/offload wrappers, FSDP1. ("module" of DDP/DataParallel is checked by type:
# a user module may well have a child called "module".)
WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def _is_data_parallel(module: torch.nn.Module) -> bool:
    return isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel))


def _plain(model: torch.nn.Module, name: str) -> str:
    parts = name.split(".")
    kept, module = [], model
    for i, part in enumerate(parts[:-1]):
        child = module._modules.get(part) if isinstance(module, torch.nn.Module) else None
        if child is None:  # a key a module's own _save_to_state_dict made up: the rest stays as it is
            return ".".join([*kept, *parts[i:]])
        if not (part in WRAPPER_ATTRIBUTES or (part == "module" and _is_data_parallel(module))):
            kept.append(part)
        module = child
    return ".".join([*kept, parts[-1]])


def parameter_names(model: torch.nn.Module, wrapped: bool = False) -> dict[torch.Tensor, str]:
    """``{parameter: name}`` of ``model`` (the first name of a tied one, as ``named_parameters``); the
    names without the wrappers' components unless ``wrapped``."""
    return {p: n if wrapped else _plain(model, n) for n, p in model.named_parameters()}


def state_dict_by_name(model: torch.nn.Module, wrapped: bool = False,
                       keep_vars: bool = False) -> dict[str, torch.Tensor]:
    """``model.state_dict(keep_vars=...)`` keyed by names without the wrappers' components unless ``wrapped``."""
    sd = model.state_dict(keep_vars=keep_vars)
    return dict(sd) if wrapped else {_plain(model, n): t for n, t in sd.items()}
