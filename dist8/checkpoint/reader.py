"""The one reader of checkpoint tensors: every tensor checked against the metadata before it is used.

Used by :func:`dist8.checkpoint.load`, ``dist8 ckpt`` and the DeepSpeed resume. Reads only
files listed (and verified) in ``metadata.json``; nothing is unpickled.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from dist8.checkpoint.format import (
    METADATA,
    STATE_DTYPES,
    CheckpointError,
    piece_range,
    rank_file,
    split_tensor_key,
    state_length,
    tensor_key,
    verify_files,
)
from dist8.checkpoint.model_file import missing_names, read_model_file, tied_conflicts
from dist8.checkpoint.names import state_dict_by_name
from dist8.kernels import Rule
from dist8.optim import get_optimizer_class
from dist8.optim.state_schema import is_signed, n_states

__all__ = ["read_model", "read_model_tensors", "read_pieces", "read_whole", "saved_rule"]


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for corrupt headers
        raise CheckpointError(f"{file} cannot be read: {str(exc)[:200]}") from None


def _expected_keys(meta_state: dict[str, str] | None, found: dict[str, str], n_states: int, name: str,
                   file: Path) -> dict[str, str]:
    """State keys (-> dtype) of one parameter: as metadata declares them (v2) or as the file holds them (v1)."""
    keys = dict(found) if meta_state is None else dict(meta_state)
    if not keys:
        return keys
    for k, dt in keys.items():  # version 2 declares only these (check_metadata); version 1: the files must too
        if dt not in STATE_DTYPES.get(k, ()):
            allowed = "/".join(STATE_DTYPES[k]) if k in STATE_DTYPES else f"one of {', '.join(STATE_DTYPES)}"
            raise CheckpointError(f"{file}: parameter {name} has tensor {k[:40]!r} of dtype {dt}, which is not "
                                  f"optimizer state (key and dtype: {allowed})")
    for i in range(1, n_states + 1):
        dt = keys.get(f"state{i}")
        if dt is None:
            raise CheckpointError(f"{file}: parameter {name} has no state{i} (the optimizer's rule needs {n_states})")
        if (dt == "uint8") != (f"absmax{i}" in keys):
            raise CheckpointError(f"{file}: parameter {name} has state{i} of dtype {dt} "
                                  f"{'without' if dt == 'uint8' else 'with'} absmax{i}")
    for k in keys:
        if k.startswith(("state", "absmax")) and int(k[-1]) > n_states:
            raise CheckpointError(f"{file}: parameter {name} has {k}, which the optimizer's rule does not have")
    return keys


def _check_values(key: str, t: torch.Tensor, signed: bool, file: Path, tkey: str) -> None:
    if t.dtype == torch.uint8:
        return
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{file}: tensor {tkey} holds NaN or inf")
    if (key.startswith("absmax") or key == "gnorm_vec" or (key.startswith("state") and not signed)) and bool(
            (t < 0).any()):
        raise CheckpointError(f"{file}: tensor {tkey} holds negative values (must be >= 0)")


def read_pieces(path: str | os.PathLike, meta: dict[str, Any], wanted: dict[str, tuple[int, int]], rule,
                verify: bool = True) -> dict[str, dict[str, Any]]:
    """The one reader of optimizer tensors: elements ``[start, stop)`` of each parameter in ``wanted``.

    ``meta`` comes from :func:`~dist8.checkpoint.format.read_metadata`. Verifies (size, and sha256
    when ``verify``) the files it reads, then checks every tensor against the metadata: only
    tensors of this rank's pieces, the keys the rule needs (declared ones in version 2), dtype,
    exact length for its piece, absmax re-sliceable, and values (absmax, fp32 state and history
    finite, non-negative where unsigned). Returns ``{name: {key: flat tensor, "step": int}}`` on the
    CPU (``master`` included when saved); parameters without saved state are absent.
    """
    path = Path(path)
    saved = {p["name"]: p for p in meta["params"]}
    where_of: dict[str, list[tuple[str, int, int, int]]] = {}
    rank_names: dict[str, set[str]] = {}
    for rank, plist in meta["pieces"].items():
        fname = rank_file(int(rank), meta["world_size"])
        rank_names[fname] = {n for n, *_r in plist}
        for name, start, stop, step in plist:
            where_of.setdefault(name, []).append((fname, start, stop, step))
    needed = sorted({f for name in wanted for f, *_r in where_of.get(name, [])})
    verify_files(path, meta, needed, checksums=verify)
    handles = {f: _open(path / f) for f in needed}
    headers: dict[str, dict[str, str]] = {}
    out: dict[str, dict[str, Any]] = {}
    try:
        keys_of: dict[tuple[str, str], dict[str, str]] = {}  # (file, parameter) -> {state key: dtype}
        for fname, h in handles.items():
            headers[fname] = {}
            for tkey in h.keys():
                name, skey = split_tensor_key(tkey)
                if name not in rank_names[fname]:
                    raise CheckpointError(f"{path / fname}: holds tensor {tkey[:100]!r} of no piece of this rank")
                headers[fname][tkey] = keys_of.setdefault((fname, name), {})[skey] = _dtype_name(
                    str(h.get_slice(tkey).get_dtype()))
        for name, (start, stop) in wanted.items():
            if name not in saved:
                raise CheckpointError(f"{path / METADATA}: parameter {name} is not in the checkpoint")
            entry, eff = saved[name], saved[name]["block_size"]
            spans = sorted(where_of.get(name, []), key=lambda t: t[1])
            if not spans:
                continue  # empty parameter
            found = {k: v for f, *_r in spans for k, v in keys_of.get((f, name), {}).items()}
            keys = _expected_keys(entry["state"], found, n_states(rule), name, path / spans[0][0])
            if set(found) - set(keys):
                raise CheckpointError(f"{path / spans[0][0]}: parameter {name} has tensors "
                                      f"{sorted(set(found) - set(keys))} that metadata does not declare")
            steps = {st for *_r, st in spans}
            if len(steps) > 1:
                raise CheckpointError(f"{path / METADATA}: pieces of parameter {name} disagree on the step {steps}")
            if not keys:
                if spans[0][3]:  # save writes step 0 for a parameter without state: its tensors were taken out
                    raise CheckpointError(f"{path / METADATA}: parameter {name} was stepped {spans[0][3]} times but "
                                          "the checkpoint holds no state for it")
                continue  # never stepped: no state saved
            parts: dict[str, list[torch.Tensor]] = {}
            for fname, s0, s1, _step in spans:
                a, b = max(start, s0), min(stop, s1)
                if a >= b:
                    continue
                h, file = handles[fname], path / fname
                for key, dt in keys.items():
                    tkey = tensor_key(name, key)
                    if tkey not in headers[fname]:
                        raise CheckpointError(f"{file}: tensor {tkey} is missing")
                    if headers[fname][tkey] != dt:
                        raise CheckpointError(f"{file}: tensor {tkey} has dtype {headers[fname][tkey]}, expected {dt}")
                    if key == "gnorm_vec" and key in parts:
                        continue
                    sl = h.get_slice(tkey)
                    shape = sl.get_shape()
                    want = state_length(key, s1 - s0, eff)
                    if len(shape) != 1 or shape[0] != want:
                        raise CheckpointError(f"{file}: tensor {tkey} has shape {list(shape)}, its piece "
                                              f"[{s0}, {s1}) needs [{want}]")
                    if key.startswith("absmax") and ((a - s0) % eff or (b != s1 and (b - s0) % eff)):
                        raise CheckpointError(f"{file}: tensor {tkey} holds one absmax per {eff} elements, which "
                                              f"cannot be re-sliced to elements [{a}, {b}) at this world size")
                    lo, hi = piece_range(key, a - s0, b - s0, eff)
                    t = sl[lo:hi].clone()
                    _check_values(key, t, key[-1].isdigit() and is_signed(rule, int(key[-1])), file, tkey)
                    parts.setdefault(key, []).append(t)
            st: dict[str, Any] = {k: torch.cat(v) if len(v) > 1 else v[0] for k, v in parts.items()}
            for k, v in st.items():
                want = state_length(k, stop - start, eff)
                if v.numel() != want:
                    raise CheckpointError(f"{path}: {k} of parameter {name} gathers {v.numel()} entries, needs {want}")
            st["step"] = spans[0][3]
            out[name] = st
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as many exception types inside safetensors
        raise CheckpointError(f"{path}: a tensor file cannot be read: {str(exc)[:200]}") from None
    finally:
        handles.clear()
    return out


def saved_rule(meta: dict[str, Any], where: str) -> Rule:
    """The update rule a checkpoint was written by, which says which state keys it holds and which are
    signed: the metadata's ``optimizer.rule`` (version 2), else its optimizer class's rule (version 1
    predates RMSprop's per-instance momentum rule, so the class's is the instance's)."""
    opt = meta["optimizer"]
    if opt["rule"] is not None:
        if opt["rule"] not in Rule.__members__:
            raise CheckpointError(f"{where}: optimizer.rule {opt['rule'][:40]!r} is not a dist8 update rule "
                                  f"({', '.join(Rule.__members__)})")
        return Rule[opt["rule"]]
    try:
        return get_optimizer_class(opt["class"]).rule
    except ValueError:
        raise CheckpointError(f"{where}: optimizer.class {opt['class'][:40]!r} is not a dist8 optimizer") from None


def read_whole(path: str | os.PathLike, meta: dict[str, Any], verify: bool = True,
               names: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Every parameter's whole state (``names``: only those parameters'), as one rank of world size 1 reads
    it: :func:`read_pieces` (every check ``load`` applies to tensors) over each parameter's elements, with
    the rule the metadata names."""
    wanted = {p["name"]: (0, math.prod(p["shape"])) for p in meta["params"] if names is None or p["name"] in names}
    return read_pieces(path, meta, wanted, saved_rule(meta, str(Path(path) / METADATA)), verify)


def _dtype_name(safetensors_dtype: str) -> str:
    return {"u8": "uint8", "uint8": "uint8", "f32": "float32", "float32": "float32", "i8": "int8", "int8": "int8",
            "i16": "int16", "int16": "int16"}.get(
        safetensors_dtype.lower(), safetensors_dtype.lower())


def read_model_tensors(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a (verified) model file under every name (tied weights: one tensor under each of
    its names, :mod:`dist8.checkpoint.model_file`); a corrupt file is one CheckpointError naming it."""
    return read_model_file(file)[0]


def read_model(file: Path, model: torch.nn.Module, strict: bool, wrapped: bool = False) -> dict[str, torch.Tensor]:
    """The model file's tensors that ``model`` takes (names and shapes checked as ``strict`` says), keyed by
    :func:`~dist8.checkpoint.names.state_dict_by_name` (``wrapped``: the wrappers' components kept)."""
    tensors = read_model_tensors(file)
    own = state_dict_by_name(model, wrapped, keep_vars=True)  # tied names share one object
    on_meta = [n for n in tensors if n in own and own[n].is_meta]
    if on_meta:  # copying into a meta tensor does nothing
        raise CheckpointError(f"{file}: model tensor {on_meta[0]} is on the meta device; materialize the model "
                              "(model.to_empty(device=...)) before loading into it")
    tied = tied_conflicts(own, {n: v for n, v in tensors.items() if n in own and v.shape == own[n].shape})
    if tied:  # whatever strict says: one of the values would silently win
        raise CheckpointError(f"{file}: " + "; ".join(tied[:3]))
    wrong = [f"{n} has shape {tuple(v.shape)}, model has {tuple(own[n].shape)}"
             for n, v in tensors.items() if n in own and tuple(own[n].shape) != tuple(v.shape)]
    missing, unexpected = missing_names(own, tensors), [k for k in tensors if k not in own]
    if strict and (wrong or missing or unexpected):
        raise CheckpointError(f"{file}: " + "; ".join(wrong + [f"model keys missing {missing[:5]}"] * bool(missing)
                                                      + [f"unexpected {unexpected[:5]}"] * bool(unexpected)))
    if wrong or missing or unexpected:
        warnings.warn(f"dist8.checkpoint.load(strict=False): {file}: skipped " + "; ".join(
            wrong + [f"missing {missing[:5]}"] * bool(missing) + [f"unexpected {unexpected[:5]}"] * bool(unexpected)),
            stacklevel=4)
    bad = {n for n, v in tensors.items() if n in own and tuple(own[n].shape) != tuple(v.shape)}
    return {k: v for k, v in tensors.items() if k in own and k not in bad}
