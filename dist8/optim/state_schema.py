"""The optimizer-state schema: the one place that names, shapes and checks dist8's per-parameter state.
(One concern: what a parameter's state and a state dict's dist8 record hold, and their checks at load.)

Every layer (the optimizers, DTensor/FSDP2, ShardedOptimizer's collectives, the checkpoint
format, the DeepSpeed segments and converters) asks this module instead of spelling keys.

The state of one parameter under a rule with ``n = n_states(rule)`` states (1, 2, or 3 for
AdEMAMix: m1, nu and the slow EMA m2) is a dict:

=================  ==========================================================================
``"step"``         int, steps taken
``"state{i}"``     ``i`` in ``1..n``: uint8 codes with the parameter's shape (8-bit), or float32
                   of that shape (32-bit). State ``i`` uses the signed map when
                   ``is_signed(rule, i)`` (Adam's first moment), else the unsigned one.
``"absmax{i}"``    8-bit only: float32, one per quantization block of ``state{i}``
``"gnorm_vec"``    percentile clipping only: float32[:data:`PERCENTILE_HISTORY`], the last
                   squared gradient norms (identical on every shard of a parameter)
``"correction"``   ``master_weight_bits`` only (bf16/fp16 parameters): int8 (24-bit master) or
                   int16 (32-bit) with the parameter's shape, elementwise (no per-block scale:
                   any sharding is exact); ``decode_master(param, correction)`` of
                   :mod:`dist8.quant.master` is the fp32 master value. Not ShardedOptimizer's
                   fp32 ``"master"`` copy of the checkpoint format.
=================  ==========================================================================

``optimizer.state_dict()`` is torch's ``{"state", "param_groups"}`` plus ``"dist8"``
(:data:`STATE_DICT_INFO`): ``{"quant_map": name}``, the map the uint8 codes were written with
(DeepSpeed's segments add their own keys). Loading refuses codes of another map
(:func:`check_state_dict_map`); a dict without it (older, or passed through a library that keeps
only ``state`` and ``param_groups``) is read with the loading optimizer's map, as before.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

from dist8.kernels import RULE_STATES, Rule
from dist8.messages import brief
from dist8.quant import MAP_NAMES, num_blocks
from dist8.quant.master import master_format

__all__ = [
    "checked_step",
    "STEP",
    "GNORM",
    "PERCENTILE_HISTORY",
    "state_key",
    "absmax_key",
    "n_states",
    "is_signed",
    "state_indices",
    "is_state_key",
    "is_absmax_key",
    "flat_length",
    "new_state",
    "check_state",
    "is_8bit_state",
    "CORRECTION",
    "correction_dtype",
    "ANY_CORRECTION",
    "STATE_DICT_INFO",
    "check_state_dict_rule",
    "states_mean_the_same",
    "MAX_STEP",
    "check_state_dict_layout",
    "check_state_dict_info",
    "state_dict_info",
    "check_state_dict_map",
]

STEP = "step"
#: The largest step a state dict may hold: the checkpoint format's bound on its integers (dist8.checkpoint
#: refused a step of 10**30 that load_state_dict had taken, at the next save, naming its own temp file).
MAX_STEP = 1 << 62
GNORM = "gnorm_vec"
PERCENTILE_HISTORY = 100  # gradient norms kept for percentile clipping
CORRECTION = "correction"  # master-weight correction (int8/int16, the parameter's shape)
ANY_CORRECTION = "any"  # check_state: accept a well-formed correction of either dtype, or none
MAX_STATES = max(len(signs) for signs in RULE_STATES.values())  # quantized states of the widest rule
STATE_DICT_INFO = "dist8"  # the state dict's top-level key for what the codes need to be read


def state_dict_info(quant_map: str, rule: Rule | None = None) -> dict[str, Any]:
    """The ``state_dict()[STATE_DICT_INFO]`` entry of an optimizer using ``quant_map`` (and update ``rule``,
    whose name says what its states mean: :func:`check_state_dict_rule`)."""
    return {"quant_map": quant_map} if rule is None else {"quant_map": quant_map, "rule": Rule(rule).name}


# Rules whose states mean the same: Adam's moments under LAMB, SGD's momentum buffer under LARS. State of
# any other pair is another quantity under the same key (Adam's first moment read as RMSprop's square
# average), and codes of a signed state read with the unsigned map are other numbers.
_SAME_STATES = (frozenset({Rule.ADAM, Rule.LAMB}), frozenset({Rule.SGD, Rule.LARS}))


def states_mean_the_same(a: Rule, b: Rule) -> bool:
    """Whether state saved under rule ``a`` is state of rule ``b`` (the same rule, or Adam/LAMB, SGD/LARS)."""
    return Rule(a) == Rule(b) or any({Rule(a), Rule(b)} <= family for family in _SAME_STATES)


def _saved_rule(state_dict: dict[str, Any]) -> Rule | None:
    """The update rule a state dict's :data:`STATE_DICT_INFO` names (None: not recorded); ValueError if it
    names none."""
    info = state_dict.get(STATE_DICT_INFO)
    saved = info.get("rule") if isinstance(info, dict) else None
    if saved is None:
        return None
    if not isinstance(saved, str) or saved not in Rule.__members__:
        raise ValueError(f"state_dict['{STATE_DICT_INFO}']['rule'] must name an update rule (one of "
                         f"{', '.join(Rule.__members__)}), got {brief(saved)}")
    return Rule[saved]


def check_state_dict_rule(state_dict: dict[str, Any], rule: Rule) -> None:
    """Refuse a state dict another optimizer's update rule wrote (its :data:`STATE_DICT_INFO` names the rule;
    a dict without it says nothing to check). Until 2026-12-05 one with as many states loaded: SGD8bit's
    momentum read as Adagrad8bit's sum of squares, AdamW8bit's moments as RMSprop's, silently."""
    saved = _saved_rule(state_dict)
    if saved is not None and not states_mean_the_same(saved, rule):
        raise ValueError(f"state_dict was written by an optimizer with update rule {saved.name}; this one's rule "
                         f"{Rule(rule).name} keeps other state (or the same keys meaning other quantities): load it "
                         "into the optimizer class that saved it")


def _holds_codes(obj: Any) -> bool:
    """Any uint8 tensor in ``obj`` (per-parameter dicts, DeepSpeed's lists of segment dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.dtype == torch.uint8
    if isinstance(obj, dict):
        return any(_holds_codes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_codes(v) for v in obj)
    return False


def check_state_dict_layout(state_dict: Any) -> None:
    """Refuse, in one line naming the entry, a state dict not shaped as ``optimizer.state_dict()`` writes
    it: a dict with ``"state"`` (a dict) and ``"param_groups"`` (a list of dicts, each with a ``"params"``
    list), and -- where present -- a ``"dist8"`` entry that is a dict naming its ``quant_map``. A list for
    ``state`` or a group without ``params`` failed as a bare AttributeError/KeyError naming nothing, and a
    malformed ``"dist8"`` entry was ignored, so codes of another map loaded as other numbers."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict()), "
                         f"got {brief(state_dict)}")
    if {"format", "rank", "world_size", "pieces"} <= state_dict.keys():  # ShardedOptimizer's shard format
        raise ValueError(f"state_dict is one rank's shard of a ShardedOptimizer (rank {brief(state_dict['rank'])} of "
                         f"{brief(state_dict['world_size'])}), not a whole optimizer's: load it into a ShardedOptimizer "
                         "at that world size, or save with ShardedOptimizer(full_state_dict=True) or dist8.checkpoint "
                         "for another world size or a plain optimizer")
    if not isinstance(state_dict["state"], dict):
        raise ValueError(f"state_dict['state'] must be a dict of per-parameter state, got {brief(state_dict['state'])}")
    groups = state_dict["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise ValueError(f"state_dict['param_groups'] must be a list of dicts, got {brief(groups)}")
    for gi, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(f"state_dict['param_groups'][{gi}] must be a dict with a 'params' list, "
                             f"got {brief(group)}")
    check_state_dict_info(state_dict)


def check_state_dict_info(state_dict: dict[str, Any]) -> None:
    """Refuse a ``"dist8"`` entry (:data:`STATE_DICT_INFO`) that is not a dict naming a known ``quant_map``
    (a dict without the entry, as torch's and bitsandbytes' optimizers write them, says nothing to check)."""
    if STATE_DICT_INFO in state_dict:
        info = state_dict[STATE_DICT_INFO]
        saved = info.get("quant_map") if isinstance(info, dict) else None
        if not isinstance(saved, str) or saved not in MAP_NAMES:
            raise ValueError(f"state_dict['{STATE_DICT_INFO}'] must be a dict whose 'quant_map' names the map the "
                             f"codes were written with (one of {', '.join(MAP_NAMES)}), got {brief(info)}")
        _saved_rule(state_dict)


def check_state_dict_map(state_dict: dict[str, Any], quant_map: str, rule: Rule | None = None) -> None:
    """Refuse a state dict whose uint8 codes were written with another map than ``quant_map`` -- or, where
    the dict records it (``"state_signed"``: a bitsandbytes conversion), with the other sign of the map
    than ``rule`` reads state ``i`` with (bitsandbytes writes RMSprop's and Adagrad's state signed)."""
    info = state_dict.get(STATE_DICT_INFO)
    saved = info.get("quant_map") if isinstance(info, dict) else None
    if saved is not None and saved != quant_map and _holds_codes(state_dict.get("state")):
        raise ValueError(f"state_dict holds 8-bit state written with quant_map={saved!r}; this optimizer uses "
                         f"quant_map={quant_map!r} and would read those codes as other numbers "
                         f"(construct it with quant_map={saved!r})")
    signed = info.get("state_signed") if isinstance(info, dict) else None
    if rule is None or not isinstance(signed, dict):
        return
    for key, was_signed in signed.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(was_signed, bool)):
            raise ValueError(f"state_dict's {STATE_DICT_INFO}.state_signed must map state numbers ('1', '2', ...) "
                             f"to true/false, got {brief(key)}: {brief(was_signed)}")
        i = int(key)
        if not 1 <= i <= n_states(rule) or was_signed == is_signed(rule, i):
            continue
        if _holds_codes([v.get(state_key(i)) for v in state_dict.get("state", {}).values() if isinstance(v, dict)]):
            kinds = ("unsigned", "signed") if was_signed else ("signed", "unsigned")
            raise ValueError(f"state_dict's {state_key(i)} codes were written with the {kinds[1]} dynamic map "
                             f"(bitsandbytes' convention); this optimizer reads {state_key(i)} with the {kinds[0]} "
                             "one and would read other numbers: convert with dist8.checkpoint.convert."
                             "from_bitsandbytes(state_dict, optimizer=optimizer), which quantizes them again")


def correction_dtype(param_dtype: torch.dtype, master_weight_bits: int | None) -> torch.dtype | None:
    """The correction's dtype for a parameter of ``param_dtype`` (int8: 24 bits, int16: 32 bits), or
    None when the parameter keeps none (``master_weight_bits`` None, or an fp32 parameter: its own master)."""
    if master_weight_bits is None or param_dtype not in (torch.bfloat16, torch.float16):
        return None
    return master_format(param_dtype, master_weight_bits).correction_dtype


def state_key(i: int) -> str:
    """Key of state ``i`` (1-based): codes (8-bit) or float32 values (32-bit)."""
    return f"state{i}"


def absmax_key(i: int) -> str:
    """Key of the per-block absmax of 8-bit state ``i``."""
    return f"absmax{i}"


def n_states(rule: Rule) -> int:
    """How many states ``rule`` keeps (1: momentum-like, 2: Adam-like, 3: AdEMAMix)."""
    return len(RULE_STATES[Rule(rule)])


def is_signed(rule: Rule, i: int) -> bool:
    """Whether state ``i`` (1-based) of ``rule`` is quantized with the signed map."""
    return RULE_STATES[Rule(rule)][i - 1]


def state_indices(rule: Rule) -> range:
    """``1..n_states(rule)``."""
    return range(1, n_states(rule) + 1)


def is_state_key(key: str) -> bool:
    return key.startswith("state") and key[5:].isdigit()


def is_absmax_key(key: str) -> bool:
    return key.startswith("absmax") and key[6:].isdigit()


def flat_length(key: str, numel: int, block_size: int) -> int:
    """Length of the flattened tensor ``key`` of a parameter with ``numel`` elements."""
    if is_absmax_key(key):
        return num_blocks(numel, block_size)
    if key == GNORM:
        return PERCENTILE_HISTORY
    return numel


def is_8bit_state(st: dict[str, Any]) -> bool:
    """True when the state dict holds 8-bit codes."""
    s = st.get(state_key(1))
    return isinstance(s, torch.Tensor) and s.dtype == torch.uint8


def new_state(
    rule: Rule,
    shape: Sequence[int],
    nblocks: int,
    use_8bit: bool,
    percentile_clipping: float,
    device: torch.device,
    correction: torch.dtype | None = None,
) -> dict[str, Any]:
    """Fresh state: zero codes and ``nblocks`` zero absmax per state (8-bit), or zero float32 state.

    ``shape`` is the shape of the parameter as this rank holds it (a local shard for
    DTensors); ``nblocks`` the absmax entries this rank holds. ``correction`` (int8/int16,
    from :func:`correction_dtype`): a zero master-weight correction (the parameter is the master).
    """
    state: dict[str, Any] = {STEP: 0}
    for i in state_indices(rule):
        if use_8bit:
            state[state_key(i)] = torch.zeros(tuple(shape), dtype=torch.uint8, device=device)
            state[absmax_key(i)] = torch.zeros(nblocks, dtype=torch.float32, device=device)
        else:
            state[state_key(i)] = torch.zeros(tuple(shape), dtype=torch.float32, device=device)
    if percentile_clipping < 100:
        state[GNORM] = torch.zeros(PERCENTILE_HISTORY, dtype=torch.float32, device=device)
    if correction is not None:
        state[CORRECTION] = torch.zeros(tuple(shape), dtype=correction, device=device)
    return state


def check_state(rule: Rule, name: str, st: dict[str, Any], shape: Sequence[int], device: torch.device,
                block_size: int | None = None, expect_8bit: bool | None = None,
                correction: torch.dtype | None | str = ANY_CORRECTION, copy: bool = True) -> dict[str, Any]:
    """Validate a loaded state dict of parameter ``name`` against the schema; returns its tensors on ``device``.

    Checks that every state of ``rule`` is present with the parameter's ``shape`` and dtype
    uint8 (with its absmax) or float32, that no state of another rule is there (e.g. Adam's
    ``state2`` loaded into SGD), that absmax, fp32 state and history are finite (absmax >= 0)
    and ``step`` is an integer >= 0; with ``block_size`` (the parameter's effective block)
    also that each absmax has one entry per block. All states of the parameter are of one kind
    (8-bit codes, each with its absmax, or float32 without one); with ``expect_8bit`` that kind
    must be the one the optimizer's settings give the parameter (a float32 tensor of codes, as
    ``torch.optim.Optimizer.load_state_dict`` would cast them, is refused, not run as 32-bit
    state). ``"correction"``, when present, must be int8
    or int16 with the parameter's shape; ``correction`` (the dtype the parameter's
    ``master_weight_bits`` needs, None for none, default :data:`ANY_CORRECTION`: either): with None a
    correction is refused (the parameter keeps none); one of the other width loads as it is and the
    parameter's next step re-encodes it (a missing correction is fine: zero, the parameter is the master). Raises
    ``KeyError``/``ValueError`` naming the parameter and key; nothing of ``st`` is modified. With
    ``copy`` (default) the tensors returned never share memory with ``st`` (as bitsandbytes, unlike
    torch's optimizers: stepping after a load must not change the state dict loaded, e.g. an
    in-memory snapshot loaded again later); ``copy=False`` is for callers whose ``st`` is already
    theirs alone (received from a collective, read from a file, moved from another parameter),
    where a copy would only double the memory of the load. An empty dict is no state (returned as a new
    empty dict): reading ``optimizer.state[p]`` before ``p``'s first step leaves one in torch's
    ``defaultdict``, ``state_dict()`` saves it as torch's optimizers do, and it must load back.
    """
    if not isinstance(st, dict) or not all(isinstance(k, str) for k in st):
        raise ValueError(f"state of parameter {name} must be a dict with string keys, got {brief(st)}")
    if not st:
        return {}
    meta = [k for k, v in st.items() if isinstance(v, torch.Tensor) and v.is_meta]
    if meta:
        raise ValueError(f"{meta[0]} of parameter {name} is on the meta device (no values to load)")
    odd = [(k, v.layout) for k, v in st.items() if isinstance(v, torch.Tensor) and (v.layout != torch.strided
                                                                                  or v.is_nested)]
    if odd:  # a sparse tensor failed deep in torch's ops, in lines naming nothing
        raise ValueError(f"{odd[0][0]} of parameter {name} is a {odd[0][1]} tensor; optimizer state is dense "
                         "(torch.strided)")
    extra = [k for k in st if (is_state_key(k) and int(k[5:]) > n_states(rule))
             or (is_absmax_key(k) and int(k[6:]) > n_states(rule))]
    if extra:
        raise ValueError(f"state of parameter {name} has {sorted(extra)}, which rule {Rule(rule).name} does not "
                         "keep (state of another optimizer?)")
    out: dict[str, Any] = {}
    kinds: dict[str, bool] = {}  # state key -> holds 8-bit codes
    for i in state_indices(rule):
        key = state_key(i)
        if key not in st:
            raise KeyError(f"state for parameter {name} has no {key!r} (keys: {sorted(st)}){_foreign_hint(st)}")
        s = st[key]
        if not isinstance(s, torch.Tensor):
            raise ValueError(f"{key} of parameter {name} is a {type(s).__name__}, not a tensor")
        kinds[key] = s.dtype == torch.uint8
        if not kinds[key] and absmax_key(i) in st:
            raise ValueError(f"{key} of parameter {name} has dtype {s.dtype} but comes with {absmax_key(i)}: "
                             "8-bit codes must stay uint8 (cast by a state-dict conversion?)")
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"{key} of parameter {name} has shape {tuple(s.shape)}, parameter has {tuple(shape)}")
        if s.dtype == torch.uint8:
            a = st.get(absmax_key(i))
            if not isinstance(a, torch.Tensor):
                raise KeyError(f"8-bit {key} of parameter {name} has no {absmax_key(i)}")
            if block_size is not None and a.numel() != num_blocks(math.prod(shape), block_size):
                raise ValueError(f"{absmax_key(i)} of parameter {name} has {a.numel()} entries, blocks of "
                                 f"{block_size} need {num_blocks(math.prod(shape), block_size)} (other block size?)")
            if a.dtype != torch.float32:  # a cast to 16 bits would have rounded every block's scale
                raise ValueError(f"{absmax_key(i)} of parameter {name} has dtype {a.dtype}; expected torch.float32 "
                                 "(cast by a state-dict conversion?)")
            if not _finite(a) or bool((a < 0).any()):
                raise ValueError(f"{absmax_key(i)} of parameter {name} holds NaN, inf or negative values")
            out[absmax_key(i)] = a.to(device, copy=copy)  # float32, checked above
        elif s.dtype != torch.float32:
            raise ValueError(f"{key} of parameter {name} has dtype {s.dtype}; expected uint8 or float32")
        elif not _finite(s):
            raise ValueError(f"{key} of parameter {name} holds NaN or inf")
        elif not is_signed(rule, i) and bool((s < 0).any()):  # a second moment read as negative: sqrt(NaN)
            raise ValueError(f"{key} of parameter {name} holds negative values; rule {Rule(rule).name} keeps "
                             "it >= 0 (a sum or average of squares)")
        out[key] = s.to(device, copy=copy).contiguous()  # the kernels read memory order; a view's logical order
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{k}: {'uint8' if is8 else 'float32'}" for k, is8 in kinds.items())
        raise ValueError(f"state of parameter {name} mixes 8-bit and 32-bit states ({listing})")
    if expect_8bit is not None and kinds and next(iter(kinds.values())) != expect_8bit:
        have, want = ("8-bit", "32-bit") if not expect_8bit else ("32-bit", "8-bit")
        raise ValueError(f"state of parameter {name} is {have}, but the optimizer keeps {want} state for it "
                         "(optim_bits, min_8bit_size or overrides differ from the run that saved it)")
    if STEP not in st:  # moments without their step count would restart the bias correction at step 1
        raise KeyError(f"state for parameter {name} has no 'step' (keys: {sorted(st)})")
    out[STEP] = checked_step(st[STEP], name)
    if GNORM in st:
        g = st[GNORM]
        if (not isinstance(g, torch.Tensor) or g.dtype != torch.float32 or g.numel() != PERCENTILE_HISTORY
                or not _finite(g) or bool((g < 0).any())):
            raise ValueError(f"{GNORM} of parameter {name} must be {PERCENTILE_HISTORY} finite float32 squared "
                             f"gradient norms >= 0, got {brief(g)}")
        out[GNORM] = g.to(device, copy=copy)  # float32, checked above
    if CORRECTION in st:
        out[CORRECTION] = _checked_correction(name, st[CORRECTION], shape, device, correction, copy)
    return out


def _foreign_hint(st: dict[str, Any]) -> str:
    """What to do with another library's state dict (its keys say whose it is)."""
    if "__bnb_optimizer_quant_state__" in st or "qmap1" in st:
        return ": a bitsandbytes state dict; load dist8.checkpoint.convert.from_bitsandbytes(state_dict) instead"
    if "exp_avg" in st or "momentum_buffer" in st or "square_avg" in st or "sum" in st:
        return (": a torch.optim state dict; convert it with "
                "dist8.checkpoint.from_torch_optim(state_dict, optimizer) and load that")
    return ""


def _checked_correction(name: str, c: Any, shape: Sequence[int], device: torch.device,
                        expected: torch.dtype | None | str, copy: bool) -> torch.Tensor:
    if not isinstance(c, torch.Tensor) or c.dtype not in (torch.int8, torch.int16):
        kind = c.dtype if isinstance(c, torch.Tensor) else type(c).__name__
        raise ValueError(f"{CORRECTION} of parameter {name} is {kind}; expected an int8 (master_weight_bits=24) "
                         "or int16 (32) tensor")
    if tuple(c.shape) != tuple(shape):
        raise ValueError(f"{CORRECTION} of parameter {name} has shape {tuple(c.shape)}, parameter has {tuple(shape)}")
    if expected is None:
        bits = 24 if c.dtype == torch.int8 else 32
        raise ValueError(f"state of parameter {name} has a {CORRECTION} ({c.dtype}) but the parameter keeps none: "
                         f"a bf16/fp16 parameter needs the optimizer built with master_weight_bits={bits}; an fp32 one "
                         "(a run continued in fp32) takes the checkpoint's fp32 weights instead (dist8 ckpt "
                         "consolidate CKPT OUT --fp32-weights, then dist8.checkpoint.load_fp32_weights)")
    # A correction of the other width (24 <-> 32) loads as it is: its dtype says how to decode it, and the
    # parameter's next step re-encodes it (master_weights.sync_correction), as when master_weight_bits is
    # changed between steps -- which is also how a live optimizer comes to save one (a parameter not stepped
    # since the change), so refusing it here left a run unable to load its own state dict.
    return c.to(device, copy=copy).contiguous()


def checked_step(step: Any, name: str, error: type[ValueError] = ValueError) -> int:
    """A loaded ``step`` as an int: a whole number >= 0 (a Python or numpy number, or a one-element
    tensor); anything else (NaN, 2.5, -1, a list, a bool) raises ``error`` (a ValueError; converters
    pass their CheckpointError) naming the parameter."""
    if isinstance(step, torch.Tensor) and (step.is_meta or step.is_nested or step.layout != torch.strided):
        raise error(f"step of parameter {name} must be a whole number in [0, 2**62], got a tensor without values "
                    f"({'meta' if step.is_meta else step.layout})")
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    whole = not isinstance(value, bool) and (isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and value == int(value)))
    if not whole or not 0 <= value <= MAX_STEP:
        raise error(f"step of parameter {name} must be a whole number in [0, 2**62], got {brief(value)}")
    return int(value)


def _finite(t: torch.Tensor) -> bool:
    """All values finite (a DTensor is checked on its local shard: every rank checks its own)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return bool(torch.isfinite(local).all())
