"""torch.optim state in: continue a torch.optim run with a dist8 optimizer (8-bit state from then on).

A run that started with ``torch.optim.AdamW`` (or SGD with momentum, RMSprop, Adagrad) keeps
going with dist8's 8-bit state: :func:`from_torch_optim` quantizes the torch state the way the
dist8 optimizer's own step would store it (its map, block size and per-parameter 8/32-bit
decision) and returns a state dict that ``optimizer.load_state_dict`` takes, with its usual
checks. The conversion itself rounds each value to its 8-bit code once (what every dist8 step
does); 32-bit state is copied exactly.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from dist8.checkpoint.format import CheckpointError
from dist8.kernels.rules import Rule
from dist8.messages import brief
from dist8.optim import state_schema as schema
from dist8.optim.base import Optimizer8bit
from dist8.optim.config import hyperparameters_of
from dist8.quant import num_blocks, quantize_blockwise

__all__ = ["TORCH_STATE_KEYS", "from_torch_optim"]

# The torch.optim state tensors each dist8 rule continues from, in dist8's order (state1, state2).
TORCH_STATE_KEYS: dict[Rule, tuple[str, ...]] = {
    Rule.ADAM: ("exp_avg", "exp_avg_sq"),  # torch.optim.Adam / AdamW
    Rule.SGD: ("momentum_buffer",),  # torch.optim.SGD with momentum
    Rule.RMSPROP: ("square_avg",),
    Rule.RMSPROP_MOMENTUM: ("square_avg", "momentum_buffer"),
    Rule.ADAGRAD: ("sum",),
    Rule.LION: ("exp_avg",),  # lion-pytorch's layout
}
_ALL_TORCH_KEYS = frozenset(k for keys in TORCH_STATE_KEYS.values() for k in keys)
# torch state that a dist8 rule cannot continue from: its key -> what produced it
_NOT_CONTINUABLE = {"max_exp_avg_sq": "amsgrad=True", "grad_avg": "centered=True RMSprop",
                    "mu_product": "NAdam's momentum schedule"}
# group entries of torch's that are kept although the dist8 group has no such key (LR schedulers read it)
_KEPT_GROUP_KEYS = ("initial_lr",)


def from_torch_optim(state_dict: dict[str, Any], optimizer: Optimizer8bit) -> dict[str, Any]:
    """A ``torch.optim`` ``state_dict`` as a state dict for the dist8 ``optimizer`` (8-bit where it keeps 8-bit state).

    Args:
        state_dict: from ``torch.optim.Adam``/``AdamW`` (``exp_avg``, ``exp_avg_sq``), ``SGD`` with
            momentum (``momentum_buffer``), ``RMSprop`` (``square_avg``, plus ``momentum_buffer`` when the
            dist8 RMSprop has momentum), ``Adagrad`` (``sum``) or lion-pytorch's ``Lion`` (``exp_avg``),
            for the same parameters in the same param groups as ``optimizer``'s (matched by position, or
            by name where the state dict lists names, as torch's distributed full state dicts do).
        optimizer: a dist8 optimizer of the matching rule (not ShardedOptimizer, which raises TypeError:
            convert into an unsharded one and save a dist8 checkpoint, which loads at any world size).

    Returns ``{"state", "param_groups", "dist8"}`` for ``optimizer.load_state_dict``: each state
    tensor is quantized with the optimizer's map and block size where the optimizer keeps 8-bit
    state for that parameter, else copied as float32; ``step`` is torch's (SGD and Lion keep none:
    1); the param groups take torch's values of the hyperparameters the dist8 groups have
    (``lr``, ``betas``, ``eps``, ``weight_decay``, ``momentum``, ...) and ``initial_lr``. A bf16
    parameter with ``master_weight_bits`` starts with a zero correction (the parameter is its
    master). Raises ``CheckpointError`` naming the parameter and key for state that does not
    fit (another optimizer's, ``amsgrad``, a wrong shape, a non-finite value).
    """
    if not isinstance(optimizer, Optimizer8bit):
        raise TypeError(f"optimizer must be a dist8 optimizer (not ShardedOptimizer), got {type(optimizer).__name__}")
    keys = TORCH_STATE_KEYS.get(optimizer.rule)
    if keys is None:
        raise CheckpointError(f"{type(optimizer).__name__} ({optimizer.rule.name}) has no torch.optim counterpart "
                              "whose state it could continue from")
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise CheckpointError("state_dict must be a torch.optim state dict: a dict with 'state' and 'param_groups'")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise CheckpointError(f"the torch state dict has {len(saved_groups)} param groups, the optimizer "
                              f"{len(optimizer.param_groups)}")
    by_name = {optimizer.param_name(p): p for g in optimizer.param_groups for p in g["params"]}
    state: dict[int, dict[str, Any]] = {}
    groups = []
    first_id = 0  # the output numbers parameters in group order, as optimizer.state_dict() does
    for gi, (saved, group) in enumerate(zip(saved_groups, optimizer.param_groups)):
        index_of = {id(p): first_id + pi for pi, p in enumerate(group["params"])}
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            raise CheckpointError(f"param group {gi}: the torch state dict lists "
                                  f"{len(ids) if isinstance(ids, list) else 'no'} parameters, the optimizer "
                                  f"{len(group['params'])}")
        _refuse_other_weight_decay(saved, optimizer, gi)
        own = hyperparameters_of(group)
        hyper = {k: v for k, v in saved.items() if k in own or k in _KEPT_GROUP_KEYS}
        out_group = dict(own, **hyper)
        for pi, key in enumerate(ids):
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise CheckpointError(f"param group {gi}: parameter ids must be ints or names, got {brief(key)}")
            p = by_name.get(key) if isinstance(key, str) else group["params"][pi]
            if p is None:
                hint = "" if optimizer.param_names else " (build it from model.named_parameters() to give it names)"
                raise CheckpointError(f"param group {gi}: the torch state dict names parameter {key!r}, which the "
                                      f"optimizer does not have{hint}")
            if id(p) not in index_of:
                raise CheckpointError(f"param group {gi}: the torch state dict lists parameter {key!r} there, the "
                                      "optimizer in another group")
            saved_state = state_dict["state"].get(key)
            if saved_state is not None and saved_state != {}:  # {}: none (reading torch's optimizer.state[p])
                settings = optimizer.settings(p, dict(group, **hyper))
                state[index_of[id(p)]] = _converted(optimizer, p, settings, saved_state, keys)
        groups.append(dict(out_group, params=list(range(first_id, first_id + len(ids)))))
        first_id += len(ids)
    return {"state": state, "param_groups": groups,
            schema.STATE_DICT_INFO: schema.state_dict_info(optimizer.quant_map, optimizer.rule)}


def _refuse_other_weight_decay(saved: dict[str, Any], optimizer: Optimizer8bit, gi: int) -> None:
    """torch 2.13's Adam and AdamW groups say how they decay (``decoupled_weight_decay``); dist8's Adam adds the
    decay to the gradient (L2), AdamW decays decoupled. The other way round trained on with another update,
    silently (3 steps 3x further from torch's own continuation). Without weight decay they are the same."""
    decoupled = getattr(optimizer, "decoupled", None)
    if decoupled is None or "decoupled_weight_decay" not in saved or not saved.get("weight_decay"):
        return
    theirs = bool(saved["decoupled_weight_decay"])
    if theirs != decoupled:
        how = {True: "decoupled (AdamW)", False: "as L2 (Adam)"}
        raise CheckpointError(f"param group {gi}: the torch optimizer decays weights {how[theirs]} "
                              f"(decoupled_weight_decay={saved['decoupled_weight_decay']!r}), "
                              f"{type(optimizer).__name__} {how[decoupled]}: continue it in dist8's "
                              f"{'AdamW' if theirs else 'Adam'} classes")


def _converted(optimizer: Optimizer8bit, p: torch.Tensor, settings: Any, st: Any, keys: tuple[str, ...]) -> dict:
    name = settings.name
    if not isinstance(st, dict):
        raise CheckpointError(f"state of parameter {name} is a {type(st).__name__}, not a dict")
    for key, why in _NOT_CONTINUABLE.items():
        if key in st:
            raise CheckpointError(f"state of parameter {name} has {key!r} ({why}), which dist8 does not implement")
    extra = [k for k in sorted(_ALL_TORCH_KEYS - set(keys)) if isinstance(st.get(k), torch.Tensor)]
    if extra:  # e.g. torch AdamW's state into Lion: it would take exp_avg and Adam's betas, and drop the rest
        hint = ("; a torch RMSprop with momentum continues in an RMSprop built with momentum > 0"
                if extra == ["momentum_buffer"] and optimizer.rule is Rule.RMSPROP else ": another optimizer's state")
        raise CheckpointError(f"state of parameter {name} has {extra[0]!r}, which {type(optimizer).__name__} does not "
                              f"continue from (it continues from {list(keys)}){hint}")
    missing = [k for k in keys if not isinstance(st.get(k), torch.Tensor)]
    if missing:
        raise CheckpointError(f"state of parameter {name} has no tensor {missing[0]!r} (keys: {sorted(map(str, st))}); "
                              f"{type(optimizer).__name__} continues from {list(keys)}")
    shape = tuple(p.shape)
    out = schema.new_state(optimizer.rule, shape, num_blocks(math.prod(shape), settings.block_size),
                           settings.use_8bit, settings.hyper["percentile_clipping"], torch.device("cpu"),
                           settings.correction)
    out[schema.STEP] = schema.checked_step(st.get("step", 1), name, CheckpointError)
    for i, key in zip(schema.state_indices(optimizer.rule), keys):
        x = st[key]
        if x.layout is not torch.strided or hasattr(x, "to_local") or x.is_nested or x.is_meta:
            raise CheckpointError(f"{key} of parameter {name} is not a plain dense tensor with values (a DTensor, "
                                  "sparse, nested or on the meta device); convert a full state dict")
        if tuple(x.shape) != shape or not x.is_floating_point():
            raise CheckpointError(f"{key} of parameter {name} is {x.dtype} {tuple(x.shape)}; the parameter is "
                                  f"{tuple(shape)}")
        x = x.detach().to("cpu", torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise CheckpointError(f"{key} of parameter {name} holds inf or NaN")
        if not schema.is_signed(optimizer.rule, i) and bool((x < 0).any()):
            raise CheckpointError(f"{key} of parameter {name} has negative values; it is a sum of squares")
        if settings.use_8bit:
            qmap = optimizer.qmap(torch.device("cpu"), schema.is_signed(optimizer.rule, i))
            codes, absmax = quantize_blockwise(x, qmap, settings.block_size)
            out[schema.state_key(i)], out[schema.absmax_key(i)] = codes, absmax
        else:
            out[schema.state_key(i)] = x.clone()
    return out
