"""cast_model: cast a model's parameters to bf16/fp16, keeping normalisation layers (and chosen names) in fp32.

torch has ``model.to(torch.bfloat16)``, which casts everything, and autocast /
FSDP2 ``MixedPrecisionPolicy``, which change the *compute* dtype but keep fp32
parameters (4 bytes each, plus an fp32 gradient). Storing bf16 parameters while
keeping the few, small, precision-sensitive norm layers in fp32 has no one-call
helper in torch, hence this one.

A kept module computes in fp32: a forward pre-hook casts its floating-point
inputs to fp32 and a forward hook casts its floating-point outputs back to the
dtype its first input had (to the model's dtype when that input was fp32 or
not a float), so it sits between bf16 layers without dtype errors (and
``RMSNorm`` keeps its fused path). The hooks follow a later ``model.float()``,
``.to(torch.bfloat16)`` or ``.half()`` of the whole model: a kept module computes in
its own parameters' dtype, and "the model's dtype" is that of an empty buffer the
cast converts with the rest.
"""
from __future__ import annotations

import fnmatch
import itertools
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from dist8.messages import brief
from dist8.optim.validation import check_flag, check_module

__all__ = ["NORM_LAYERS", "cast_model", "is_kept_fp32", "is_norm_layer"]

#: torch's module types kept in fp32 by default (``keep_norm_layers=True``); see :func:`is_norm_layer`
#: for the norm layers of other libraries.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_CASTABLE = (torch.bfloat16, torch.float16, torch.float32)
_KEPT_ATTR = "_dist8_kept_fp32"
# A kept module's empty, non-persistent buffer in the model's dtype: casts of the whole model
# (model.float(), .to(torch.bfloat16), .half()) convert it with the rest, so its dtype is the
# model's dtype now. Not in state_dict; costs nothing to copy, pickle or move.
_MODEL_DTYPE_BUFFER = "_dist8_model_dtype"
# "Norm" as a word of the class name: LlamaRMSNorm, T5LayerNorm, MambaRMSNormGated, FusedRMSNorm, BatchNorm2d;
# not Normal, Normalize, NormalizedEmbedding.
_NORM_CLASS_NAME = re.compile(r"Norm(?![a-z])")


def is_norm_layer(module: nn.Module) -> bool:
    """True for the modules ``cast_model(keep_norm_layers=True)`` keeps in fp32.

    torch's norm layers (:data:`NORM_LAYERS`), and the norm layers other libraries write as their
    own classes -- transformers' ``LlamaRMSNorm``, ``Qwen2RMSNorm``, ``GemmaRMSNorm``,
    ``T5LayerNorm``, ``MambaRMSNormGated`` ...: a module whose class name has ``Norm`` as a word,
    with no submodules and at least one parameter, every one of them a vector (a scale or a
    shift). That leaves out containers such as ``PreNorm(dim, fn)`` (their ``fn`` would compute in
    fp32 with low-precision weights) and fused layers such as ``LayerNormLinear`` (a matrix).

    Args:
        module: the module to classify (by its own class and parameters; its submodules are not searched).
    """
    if isinstance(module, NORM_LAYERS):
        return True
    if not _NORM_CLASS_NAME.search(type(module).__name__) or next(module.children(), None) is not None:
        return False
    own = list(module.parameters(recurse=False))
    return bool(own) and all(p.dim() <= 1 for p in own)


def is_kept_fp32(module: nn.Module) -> bool:
    """True for a module that :func:`cast_model` kept in fp32 (and runs in fp32) next to low-precision ones.

    Args:
        module: any module; False for one :func:`cast_model` did not keep, and for every module of
            a model cast to ``torch.float32`` (nothing is kept apart then).
    """
    return bool(getattr(module, _KEPT_ATTR, False))


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _first_float_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.dtype
    return None


def _own_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a kept module computes in: its parameters' (fp32, unless the whole model was cast
    again afterwards, e.g. ``model.to(torch.bfloat16)``)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    for name, t in module.named_buffers():
        if t.is_floating_point() and not name.endswith(_MODEL_DTYPE_BUFFER):
            return t.dtype
    return torch.float32


def _model_dtype(module: nn.Module) -> torch.dtype | None:
    """The model's dtype now (``model.float()`` after cast_model makes it fp32)."""
    probe = module._buffers.get(_MODEL_DTYPE_BUFFER)
    return probe.dtype if probe is not None else None


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    own = _own_dtype(module)
    module._dist8_dtypes = (_first_float_dtype(args, kwargs), own)  # for _post_hook
    return _cast_floats(args, own), _cast_floats(kwargs, own)


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    # Outputs take the input's low-precision dtype; an fp32 input (Mamba casts the norm's input to the
    # norm's weight dtype; a model's first BatchNorm gets fp32 images) or none (an embedding's ids)
    # returns in the model's dtype: fp32 activations would meet the next bf16 layer with a dtype
    # mismatch. A module cast again with the whole model (no longer fp32) returns its own dtype.
    dtype, own = module.__dict__.pop("_dist8_dtypes", (None, torch.float32))
    if own != torch.float32:
        return output
    if dtype is None or dtype == torch.float32:
        dtype = _model_dtype(module)
    return output if dtype is None or dtype == torch.float32 else _cast_floats(output, dtype)


def _refuse_split_ties(model: nn.Module, kept_ids: set[int], dtype: torch.dtype) -> None:
    """A parameter shared by a kept module and a cast one (GPT-2's output head tied to its token
    embedding, with ``keep_fp32=["lm_head"]``) can have one dtype only: the other module would fail
    at the first forward with a dtype mismatch naming neither. Refused before anything is cast."""
    owners: dict[int, list[tuple[str, bool]]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point():
                owners.setdefault(id(p), []).append((f"{mod_name}.{name}" if mod_name else name, id(module) in kept_ids))
    for found in owners.values():
        kept = [n for n, k in found if k]
        cast = [n for n, k in found if not k]
        if kept and cast:
            raise ValueError(f"cast_model: {kept[0]} is kept fp32 but is the same tensor as {cast[0]} (tied weights), "
                             f"whose module is cast to {str(dtype).replace('torch.', '')}: keep both modules in "
                             "fp32 (keep_fp32) or neither")


def cast_model(
    model: nn.Module,
    dtype: torch.dtype = torch.bfloat16,
    keep_fp32: Sequence[str] = (),
    *,
    keep_norm_layers: bool = True,
) -> nn.Module:
    """Cast ``model``'s floating-point parameters and buffers to ``dtype`` in place; returns ``model``.

    Args:
        model: the module to cast (before wrapping it with FSDP2 or creating the optimizer).
        dtype: ``torch.bfloat16`` (default), ``torch.float16`` or ``torch.float32``.
        keep_fp32: fnmatch patterns of module names (``"lm_head"``, ``"*.router"``) or
            parameter names (``"lm_head.weight"``); a matching module (with everything
            inside it) keeps its parameters and buffers in fp32 and computes in fp32. A pattern that matches
            some but not all parameters of one module is refused (a module computes in one dtype),
            and so is a pattern that matches nothing (a typo would leave the module in ``dtype``).
        keep_norm_layers: keep the norm layers (:func:`is_norm_layer`: torch's LayerNorm, RMSNorm,
            GroupNorm, BatchNorm, InstanceNorm, LocalResponseNorm, and other libraries' norm classes
            such as transformers' ``LlamaRMSNorm`` or ``T5LayerNorm``) in fp32. Default True.

    Kept modules get forward hooks that run them in fp32 and return outputs in their
    input's dtype. Every dist8 optimizer and :class:`dist8.ShardedOptimizer` take the
    resulting mix of bf16 and fp32 parameters; FSDP2 needs one dtype per ``fully_shard`` group,
    which :func:`dist8.integrations.fsdp.fully_shard` arranges (the kept modules get their own).
    """
    if dtype not in _CASTABLE:
        raise ValueError(f"cast_model: dtype must be one of {', '.join(map(str, _CASTABLE))}, got {brief(dtype)}")
    check_module(model, "cast_model: model")
    keep_norm_layers = check_flag(keep_norm_layers, "cast_model: keep_norm_layers")  # "no" kept them (truthy)
    if isinstance(keep_fp32, str):
        keep_fp32 = [keep_fp32]
    if not isinstance(keep_fp32, (Sequence, set, frozenset)) or not all(isinstance(p, str) for p in keep_fp32):
        raise TypeError(f"cast_model: keep_fp32 must be a name pattern or a list of them (str), got {brief(keep_fp32)}")
    names = [n for n, _ in model.named_modules() if n] + [n for n, _ in model.named_parameters()]
    unmatched = [pat for pat in keep_fp32 if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
    if unmatched:  # a typo would silently leave the module in low precision
        raise ValueError(f"cast_model: keep_fp32 pattern {unmatched[0]!r} matches no module or parameter name of "
                         f"the model (names look like {', '.join(names[:4])})")
    kept: list[nn.Module] = []
    kept_prefixes: list[str] = []
    for mod_name, module in model.named_modules():  # parents come before their children
        own = [f"{mod_name}.{n}" if mod_name else n for n, _ in module.named_parameters(recurse=False)]
        by_module = bool(mod_name) and (any(fnmatch.fnmatchcase(mod_name, pat) for pat in keep_fp32)
                                        or any(mod_name.startswith(prefix + ".") for prefix in kept_prefixes))
        by_param = [n for n in own if any(fnmatch.fnmatchcase(n, pat) for pat in keep_fp32)]
        is_norm = keep_norm_layers and is_norm_layer(module)
        if by_param and len(by_param) != len(own) and not (by_module or is_norm):
            rest = sorted(set(own) - set(by_param))
            raise ValueError(
                f"cast_model: keep_fp32 matches {', '.join(by_param)} but not {', '.join(rest)} of module "
                f"{mod_name or '<root>'}; a module computes in one dtype, so match all of its parameters or its name"
            )
        if by_module:
            kept_prefixes.append(mod_name)
        if by_module or by_param or is_norm:
            kept.append(module)
    kept_ids = {id(m) for m in kept}
    if dtype != torch.float32:
        _refuse_split_ties(model, kept_ids, dtype)
    for module in model.modules():
        target = torch.float32 if id(module) in kept_ids else dtype
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)
        for name, b in module.named_buffers(recurse=False):
            if b.is_floating_point() and b.dtype != target:
                setattr(module, name, b.to(target))
    if dtype != torch.float32:
        for module in kept:
            first = next(itertools.chain(module.parameters(), module.buffers()), None)
            device = first.device if first is not None else torch.device("cpu")
            module.register_buffer(_MODEL_DTYPE_BUFFER, torch.empty(0, dtype=dtype, device=device), persistent=False)
            if not getattr(module, _KEPT_ATTR, False):
                module.register_forward_pre_hook(_pre_hook, with_kwargs=True)
                module.register_forward_hook(_post_hook, with_kwargs=True)
                setattr(module, _KEPT_ATTR, True)
    return model
