"""fp32 master weights in and out of a bf16/fp16 model trained with ``master_weight_bits``.

Out: ``dist8 ckpt consolidate CKPT OUT --fp32-weights`` writes ``OUT/model-fp32.safetensors``
(:func:`dist8.checkpoint.convert.fp32_weights`: ``decode_master(param, correction)``).

In: :func:`load_fp32_weights` loads fp32 weights (such a file, a Hugging Face export, a
``state_dict``) into a model whose parameters are bf16/fp16 and whose dist8 optimizer keeps a
correction: each parameter and its correction become ``encode_master_exact(weight)``
(:mod:`dist8.quant.master`), so training continues from the fp32 value (to the master's error
bound) rather than from the rounded bf16 one. A round trip
``consolidate --fp32-weights`` -> ``load_fp32_weights`` restores every fp32 master value bitwise (the
(parameter, correction) pairs too, except where two pairs decode to the same value).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dist8.checkpoint.format import CheckpointError
from dist8.checkpoint.model_file import missing_names, tied_conflicts
from dist8.checkpoint.names import parameter_names, state_dict_by_name
from dist8.checkpoint.reader import read_model_tensors
from dist8.optim import dtensor_layout as dtl
from dist8.optim.base import Optimizer8bit
from dist8.optim.state_schema import CORRECTION
from dist8.optim.validation import check_flag, check_module
from dist8.quant import DEFAULT_BLOCK_SIZE
from dist8.quant.master import encode_master, encode_master_exact
from dist8.shard import ShardedOptimizer
from dist8.shard.agreement import raise_on_every_rank

__all__ = ["load_fp32_weights"]


@torch.no_grad()
def load_fp32_weights(source: str | os.PathLike | dict[str, torch.Tensor], model: torch.nn.Module,
                      optimizer: Optimizer8bit | ShardedOptimizer | None = None, *, strict: bool = True) -> None:
    """Load fp32 weights into ``model``, re-encoding the master-weight correction of ``optimizer``.

    Args:
        source: a safetensors file (e.g. ``model-fp32.safetensors``) or a ``{name: tensor}`` dict
            keyed like ``model.state_dict()`` (its names with or without the components of wrappers such as
            ``torch.compile``'s ``_orig_mod.``, :mod:`dist8.checkpoint.names`).
        model: the model (bf16/fp16 parameters, fp32 norm layers: any mix).
        optimizer: the model's dist8 optimizer or :class:`dist8.ShardedOptimizer` (same parameters).
            Parameters whose settings keep a correction (``master_weight_bits``) get
            ``encode_master(weight)``: the rounded parameter and its correction; others take the
            weight cast to their dtype. None: every parameter is cast (the fp32 remainder is lost).
        strict: refuse missing or unexpected names (default True); shapes must always match.

    Raises :class:`CheckpointError` (one line naming the file and tensor) before changing anything.
    Call it on every rank with the same (full) weights: parameters are replicated under
    ``ShardedOptimizer`` (each rank encodes the correction of its own pieces); DTensor (FSDP2)
    parameters take their local shard of each weight (no communication) and the optimizer keeps
    that shard's correction, as it does in training.
    """
    strict = check_flag(strict, "strict")  # None/"yes" were truthiness
    check_module(model, "load_fp32_weights: model")
    where = str(source) if not isinstance(source, dict) else "fp32 weights"
    refused: CheckpointError | None = None
    try:
        tensors, own, wrapped = _checked_weights(source, model, strict, where)
    except CheckpointError as exc:
        refused = exc
    if isinstance(optimizer, ShardedOptimizer):  # its load is collective: a rank refusing alone left the others in it
        raise_on_every_rank(refused, optimizer.group, "load_fp32_weights", CheckpointError)
    elif refused is not None:
        raise refused
    params = {n: p for p, n in parameter_names(model, wrapped).items()}
    if isinstance(optimizer, ShardedOptimizer):
        index = {id(p): i for i, p in enumerate(optimizer.params)}
        optimizer.load_fp32_master({index[id(p)]: tensors[n] for n, p in params.items()
                                    if n in tensors and id(p) in index})
        done = {n for n, p in params.items() if id(p) in index}
    else:
        done = set()
        group_of = {p: g for g in (optimizer.param_groups if optimizer is not None else []) for p in g["params"]}
        for n, p in params.items():
            if n not in tensors or p not in group_of:
                continue
            settings = optimizer.settings(p, group_of[p])
            if settings.correction is None:
                continue
            bits = 24 if settings.correction == torch.int8 else 32
            w = _local_part(tensors[n].float(), p).contiguous()
            rounded, correction = encode_master_exact(w, p.dtype, bits)
            dtl.local(p).copy_(rounded)
            if not optimizer.state.get(p):
                optimizer.state[p] = optimizer.init_state(p, settings)
            optimizer.state[p][CORRECTION] = correction.to(p.device)
            done.add(n)
    done_ids = {id(params[n]) for n in done}  # a tied weight's other names: encoded already
    for n, t in tensors.items():
        if n in own and n not in done and id(own[n]) not in done_ids:
            target = own[n]
            value = _local_part(t.float() if target.is_floating_point() else t, target)
            if target.dtype in (torch.bfloat16, torch.float16):  # round to nearest, saturating like encode
                value = encode_master(value.contiguous(), target.dtype, 24)[0]
            dtl.local(target).copy_(value)


def _checked_weights(source: str | os.PathLike | dict[str, torch.Tensor], model: torch.nn.Module, strict: bool,
                     where: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], bool]:
    """The weights (read from ``source``), the model's tensors by name and whether those are the wrapped
    model's names, after every check; :class:`CheckpointError` naming ``where`` otherwise."""
    tensors = read_model_tensors(Path(source)) if not isinstance(source, dict) else dict(source)
    # the parameters themselves (tied names share one object), named without the wrappers around the model
    own, wrapped = state_dict_by_name(model, keep_vars=True), False
    if missing_names(own, tensors):  # weights keyed by a wrapped model's state_dict (torch.compile's _orig_mod.)
        names = state_dict_by_name(model, wrapped=True, keep_vars=True)
        if not missing_names(names, tensors):
            own, wrapped = names, True
    problems = [f"{n} has shape {tuple(t.shape)}, the model has {tuple(own[n].shape)}"
                for n, t in tensors.items() if n in own and tuple(t.shape) != tuple(own[n].shape)]
    problems += [f"{n} is {t.dtype}, not a floating-point tensor" for n, t in tensors.items()
                 if n in own and own[n].is_floating_point() and not t.is_floating_point()]
    if strict:
        problems += [f"model tensor {n} is missing" for n in missing_names(own, tensors)]
        problems += [f"{n} is not a tensor of the model" for n in tensors if n not in own]
    problems += tied_conflicts(own, tensors)
    if problems:
        raise CheckpointError(f"{where}: " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))
    return tensors, own, wrapped


def _local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` itself, or, for a DTensor ``like``, the part of ``full`` its local shard holds
    (the optimizer's own shard layout, as when it localizes loaded state; no communication)."""
    if not dtl.is_dtensor(like):
        return full
    return dtl.layout_of(like, DEFAULT_BLOCK_SIZE).slice_global(full.to(like.device))  # any block: slicing only
