"""The model files of a checkpoint (``model.safetensors``, ``model-fp32.safetensors``): one writer, one reader.

Tied weights. A model whose state dict holds one tensor under several names (GPT-2's and
Llama's ``lm_head.weight`` tied to the token embedding, T5, ...) cannot be written as it is:
safetensors refuses tensors that share memory. The writer stores such a tensor once, under
its first name, and records the other names in the file's header metadata,
``"aliases": {"<other name>": "<stored name>"}`` (JSON); the reader gives every alias the
stored tensor back, so the names are those of ``model.state_dict()`` again. Only exact
aliases (same storage, offset, shape, strides and dtype) are folded; any other overlap
(a buffer that is a slice of a parameter) is written as a copy of its own.

The reader checks the aliases like the rest of a checkpoint: a JSON object of names, each
naming a stored tensor, none shadowing one; anything else is one :class:`CheckpointError`
naming the file. Nothing is unpickled.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dist8.checkpoint.errors import CheckpointError

__all__ = ["ALIASES", "missing_names", "read_model_file", "tied_conflicts", "write_model_file"]

ALIASES = "aliases"  # header metadata key: {"<alias>": "<stored name>"}


def _identity(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def write_model_file(file: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                     aliases: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to the safetensors ``file`` with header ``metadata`` (a tensor under several
    names once, see above; ``aliases``: further ``{alias: stored name}`` the caller already folded)."""
    stored: dict[str, torch.Tensor] = {}
    folded = dict(aliases or {})
    first_of: dict[tuple, str] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model state entry {name} is a {type(t).__name__}, not a tensor (a module's "
                            "get_extra_state?); dist8 checkpoints hold tensors only (safetensors, nothing pickled)")
        t = t.detach()
        key = _identity(t) if t.numel() else None  # empty tensors share no bytes
        if key is not None and key in first_of:
            folded[name] = first_of[key]
            continue
        if key is not None:
            first_of[key] = name
        stored[name] = t
    # Contiguous CPU tensors for safetensors; whatever still overlaps another one's bytes (a buffer that
    # is a slice of a parameter) goes as a copy. Disjoint views of one storage (ShardedOptimizer's
    # parameters in its flat buffer) are written as they are, without copying the model.
    out = {name: t.contiguous().cpu() for name, t in stored.items()}
    spans = sorted((t.untyped_storage().data_ptr(), t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in out.items() if t.numel())
    reach: dict[int, int] = {}  # per storage: the end of the bytes already written
    for storage, start, end, name in spans:
        if start < reach.get(storage, start):
            out[name] = out[name].clone()
        reach[storage] = max(reach.get(storage, end), end)
    meta = dict(metadata)
    if folded:
        meta[ALIASES] = json.dumps(folded, sort_keys=True)
    save_file(out, str(file), metadata=meta)


def read_model_file(file: str | os.PathLike, expand: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, aliases)`` of a model file. With ``expand`` each alias maps to its stored tensor (the
    same object) in ``tensors``; without, ``tensors`` holds the stored names only. A corrupt file or bad
    aliases: one :class:`CheckpointError` naming the file."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt files
        raise CheckpointError(f"{file} cannot be read: {str(exc)[:200]}") from None
    aliases: dict[str, str] = {}
    if ALIASES in header:
        try:
            aliases = json.loads(header[ALIASES])
        except ValueError:
            raise CheckpointError(f"{file}: header metadata {ALIASES!r} is not JSON") from None
        if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in aliases.items()):
            raise CheckpointError(f"{file}: header metadata {ALIASES!r} must map tensor names to tensor names")
        for alias, target in aliases.items():
            if alias in tensors:
                raise CheckpointError(f"{file}: alias {alias[:100]!r} is also a stored tensor")
            if target not in tensors:
                raise CheckpointError(f"{file}: alias {alias[:100]!r} names {target[:100]!r}, which is not stored")
    if expand:
        tensors.update({alias: tensors[target] for alias, target in aliases.items()})
    return tensors, aliases


def tied_conflicts(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Problems (one phrase each) where names of one tied tensor of the model carry different values in
    ``tensors`` (one would silently win). ``own``: ``model.state_dict(keep_vars=True)``, whose tied names
    share one object."""
    names_of: dict[int, list[str]] = {}
    for n, t in own.items():
        if n in tensors:
            names_of.setdefault(id(t), []).append(n)
    return [f"{first} and {n} are one tied tensor of the model, but their values differ"
            for first, *others in names_of.values() for n in others
            if tensors[n].shape == tensors[first].shape and not torch.equal(tensors[n], tensors[first])]


def missing_names(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of ``own`` (``model.state_dict(keep_vars=True)``) that ``tensors`` lacks, leaving out a tied
    tensor's other names when one of them is there (Hugging Face's files store a tied weight once)."""
    present = {id(t) for n, t in own.items() if n in tensors}
    return [n for n, t in own.items() if n not in tensors and id(t) not in present]
