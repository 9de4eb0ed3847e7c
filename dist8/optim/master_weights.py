"""``master_weight_bits`` in the optimizers: which parameters keep a correction, and the torch-side
decode/encode of what does not run in a kernel (LAMB/LARS's parameter norm, a changed setting).

A bf16/fp16 parameter of a group (or name override) with ``master_weight_bits=24`` (32) keeps an
int8 (int16) ``"correction"`` in its state (:mod:`dist8.optim.state_schema`); the fused kernels
decode ``(param, correction)`` to the fp32 master, apply the rule and re-encode both
(:mod:`dist8.quant.master` is the specification, ``dist8_rules.h`` its kernel twin). fp32
parameters are their own master and are unaffected, so a model cast with
:func:`dist8.cast_model` (norm layers kept fp32) can use the option; an optimizer whose
parameters are all fp32 refuses it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from dist8.optim import dtensor_layout as dtl
from dist8.optim.config import match_overrides
from dist8.optim.state_schema import CORRECTION
from dist8.quant.master import decode_master, encode_master

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit

__all__ = ["HALF_DTYPES", "check_applies", "check_half_params", "sync_correction", "master_value"]

HALF_DTYPES = (torch.bfloat16, torch.float16)


def _requested(opt: Optimizer8bit) -> int | None:
    """Some non-None ``master_weight_bits`` of a group or override, else None."""
    for group in opt.param_groups:
        if group.get("master_weight_bits") is not None:
            return group["master_weight_bits"]
    for extra in opt.overrides.values():
        if extra.get("master_weight_bits") is not None:
            return extra["master_weight_bits"]
    for group in opt.param_groups:  # module marks (config.OVERRIDE_ATTR)
        for p in group["params"]:
            bits = match_overrides(None, p, {}).get("master_weight_bits")
            if bits is not None:
                return bits
    return None


def check_applies(opt: Optimizer8bit) -> None:
    """ValueError naming ``master_weight_bits`` when it is set but no parameter is bf16/fp16.

    DTensor (FSDP2) parameters keep the correction of their local shard (elementwise, so exact):
    :mod:`dist8.optim.dtensor_update` passes it to the kernel and decodes/encodes the shard-edge blocks."""
    bits = _requested(opt)
    params = [p for group in opt.param_groups for p in group["params"]]
    if params:  # none: the inner optimizer of a rank that owns no blocks (ShardedOptimizer checks all)
        check_half_params(bits, [p.dtype for p in params])


def check_half_params(bits: int | None, dtypes: list[torch.dtype]) -> None:
    """ValueError naming ``master_weight_bits`` when it is set (``bits``) but none of ``dtypes`` is bf16/fp16."""
    if bits is not None and not any(dtype in HALF_DTYPES for dtype in dtypes):
        raise ValueError(f"master_weight_bits={bits} needs bfloat16/float16 parameters, but all parameters are "
                         "float32 (their own master); cast the model (dist8.cast_model) or use master_weight_bits=None")


def sync_correction(p: torch.Tensor, state: dict[str, Any], want: torch.dtype | None,
                    made_for: torch.dtype | None = None) -> None:
    """Make ``state``'s correction match ``want`` (the dtype the parameter's setting needs now):
    created as zeros (the parameter is the master), re-encoded when the bits changed (24 <-> 32),
    dropped when the setting was turned off (the parameter keeps its rounded value).

    ``made_for``: the parameter dtype the correction was encoded against, when the parameter has been
    cast since (``model.float()``, ``model.half()`` after bf16 steps). Where that cast kept every value
    (to fp32; bf16 to fp16 in fp16's range) the master is decoded from the parameter read back in that
    dtype and carried over: written into an fp32 parameter whole, re-encoded for the other half dtype.
    A cast that rounded (fp16 to bf16) made the rounded parameter the master: its correction restarts
    at zero. Read against the new dtype, the correction was dropped (fp32: up to half a bf16 unit of
    every value lost) or misread, silently."""
    have = state.get(CORRECTION)
    local = dtl.local(p.detach())  # a DTensor keeps the correction of its local shard
    if have is not None and made_for is not None and made_for != local.dtype:
        if torch.finfo(local.dtype).eps > torch.finfo(made_for).eps:  # the cast rounded every value
            state[CORRECTION] = torch.zeros(local.shape, dtype=want, device=local.device)
            return
        master = decode_master(local.to(made_for), have)
        if want is None:
            local.copy_(master)
            del state[CORRECTION]
        else:
            new_p, state[CORRECTION] = encode_master(master, local.dtype, 24 if want == torch.int8 else 32)
            local.copy_(new_p)
        return
    if want is None:
        if have is not None:
            del state[CORRECTION]
        return
    p = local
    if have is None:
        state[CORRECTION] = torch.zeros(p.shape, dtype=want, device=p.device)
    elif have.dtype != want:
        bits = 24 if want == torch.int8 else 32
        new_p, state[CORRECTION] = encode_master(decode_master(p, have), p.dtype, bits)
        p.copy_(new_p)


def master_value(p: torch.Tensor, correction: torch.Tensor | None) -> torch.Tensor:
    """The flat fp32 master of ``p`` (decoded with its correction, or ``p`` itself)."""
    flat = p.detach().reshape(-1)
    if correction is None:
        return flat.float()
    return decode_master(flat, correction.view(-1))
