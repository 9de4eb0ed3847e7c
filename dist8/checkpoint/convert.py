"""Converters: bitsandbytes state dicts in, dequantized torch-Adam state out, and one-file consolidation."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dist8.checkpoint.files import member, safetensors_header
from dist8.checkpoint.format import (
    FORMAT,
    FP32_WEIGHTS_FILE,
    METADATA,
    MODEL_FILE,
    CheckpointError,
    check_output_dir,
    file_entry,
    install_dir,
    rank_file,
    read_metadata,
    split_tensor_key,
    temp_dir,
    tensor_key,
    verify_files,
    write_metadata,
)
from dist8.checkpoint.groups import check_saved_groups
from dist8.checkpoint.reader import read_whole
from dist8.kernels.rules import Rule, read_state, state_floored
from dist8.optim.state_schema import (CORRECTION, GNORM, STATE_DICT_INFO, checked_step, is_signed, n_states,
                                      state_dict_info, state_indices)
from dist8.quant import dequantize_blockwise, dynamic_map, get_map, num_blocks, quantize_blockwise

__all__ = ["from_bitsandbytes", "to_bitsandbytes", "export_fp32_adam", "consolidate", "fp32_weights"]

BNB_WRAPPER = "__bnb_optimizer_quant_state__"
_BNB_DROP = {"qmap1", "qmap2", "unorm_vec", "gnorm_vec", "max1", "max2", "new_max1", "new_max2"}


# bitsandbytes' maps per state: qmap1 "dynamic" (signed) for every optimizer -- RMSprop's and Adagrad's
# square averages too, which dist8 writes with the unsigned map -- qmap2 "udynamic", AdEMAMix's slow EMA qmap1
_BNB_SIGNED = {1: True, 2: False, 3: True}


def _requantize(codes: torch.Tensor, absmax: torch.Tensor, signed: bool,
                block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes written with the dynamic map of sign ``signed``, decoded and quantized again with the other
    sign's map (within half a step of it): (codes of ``codes``' shape, absmax)."""
    values = dequantize_blockwise(codes.reshape(-1), absmax.float(), dynamic_map(signed), block_size)
    new_codes, new_absmax = quantize_blockwise(values, dynamic_map(not signed), block_size)
    return new_codes.view(codes.shape), new_absmax


def from_bitsandbytes(state_dict: dict[str, Any], block_size: int = 256,
                      optimizer: Any | None = None) -> dict[str, Any]:
    """Turn a bitsandbytes block-wise 8-bit optimizer ``state_dict`` into a dist8 one.

    Unwraps ``__bnb_optimizer_quant_state__``; keeps ``state1/2`` codes, ``absmax1/2`` and
    ``step``; checks that bitsandbytes' maps equal dist8's dynamic maps and that absmax
    has one entry per ``block_size`` values. AdEMAMix (bitsandbytes stacks its two EMAs as a
    ``(2, n)`` ``state1``, with a ``(2, blocks)`` ``absmax1``) becomes dist8's ``state1`` (the fast
    EMA m1) and ``state3`` (the slow EMA m2), ``state2`` staying nu. The result's tensors are
    copies (none shared with the bitsandbytes optimizer). Load it with ``optimizer.load_state_dict``
    of an optimizer with the dynamic map (the default; the result names it, so another map refuses it).

    Exact (the same codes) where bitsandbytes and dist8 use the same map for a state. They differ for
    RMSprop's and Adagrad's state (bitsandbytes: the signed map, dist8: the unsigned one, which has
    twice the codes for non-negative values): pass ``optimizer`` (the dist8 optimizer that will load
    the result) and those states are decoded and quantized again with its map (within half a step of
    the unsigned map). The result records which map wrote each state, so an optimizer whose map differs
    refuses it at ``load_state_dict`` instead of reading the codes as other numbers.
    """
    _check_structure(state_dict)
    rule = None if optimizer is None else getattr(optimizer, "rule", None)
    if optimizer is not None and rule is None:
        raise CheckpointError(f"optimizer must be a dist8 optimizer, got {type(optimizer).__name__}")
    signs: dict[str, bool] = {}
    out_state = {}
    for pid, st in state_dict["state"].items():
        if not st:  # no state (reading bitsandbytes' optimizer.state[p] before p's first step makes one)
            out_state[pid] = {}
            continue
        st = dict(st)
        wrapper = st.pop(BNB_WRAPPER, {})
        if not isinstance(wrapper, dict):
            raise CheckpointError(f"parameter {pid}: {BNB_WRAPPER} is a {type(wrapper).__name__}, not a dict")
        st.update(wrapper)
        st = _unstack_ademamix(pid, st)
        for i, signed in _BNB_SIGNED.items():
            q = st.get(f"qmap{i}")
            if q is not None and not (isinstance(q, torch.Tensor) and not q.is_meta and q.layout == torch.strided
                                      and q.shape == (256,) and torch.equal(q.float().cpu(), dynamic_map(signed))):
                raise CheckpointError(f"parameter {pid}: qmap{i} is not the dynamic map dist8 uses")
            s, a = st.get(f"state{i}"), st.get(f"absmax{i}")
            if s is not None and s.dtype == torch.uint8:
                if a is None or a.numel() != num_blocks(s.numel(), block_size):
                    raise CheckpointError(f"parameter {pid}: absmax{i} does not hold one value per {block_size} "
                                          "codes (not a block-wise 8-bit state)")
        new = {k: v for k, v in st.items() if k not in _BNB_DROP}
        new["step"] = checked_step(new.get("step", 0), str(pid), CheckpointError)
        for k, v in list(new.items()):
            if torch.is_tensor(v):  # copies: the bitsandbytes optimizer may go on stepping its own tensors
                fp32_state = k.startswith("state") and v.dtype != torch.uint8
                new[k] = v.to(torch.float32, copy=True) if fp32_state else v.clone()
        for i, signed in _BNB_SIGNED.items():
            s = new.get(f"state{i}")
            if not (isinstance(s, torch.Tensor) and s.dtype == torch.uint8):
                continue
            if rule is not None and i <= n_states(rule) and is_signed(rule, i) != signed:
                new[f"state{i}"], new[f"absmax{i}"] = _requantize(s, new[f"absmax{i}"], signed, block_size)
                signed = not signed
            signs[str(i)] = signed
        out_state[pid] = new
    # bitsandbytes' codes are the dynamic map's: an optimizer with another quant_map refuses them
    info = dict(state_dict_info("dynamic"), **({"state_signed": signs} if signs else {}))
    return {"state": out_state, "param_groups": [dict(g) for g in state_dict["param_groups"]],
            STATE_DICT_INFO: info}


def to_bitsandbytes(optimizer: Any, bnb_optimizer: Any) -> dict[str, Any]:
    """dist8 ``optimizer``'s state as the state dict ``bnb_optimizer.load_state_dict`` takes.

    ``bnb_optimizer``: the bitsandbytes optimizer of the same kind over the same parameters in the same
    order; it keeps its own hyperparameters except ``lr`` (and a scheduler's ``initial_lr``), taken from
    dist8's groups. Exact (the same codes, absmax and step) where both use the same map for a state;
    RMSprop's and Adagrad's square average is quantized again with bitsandbytes' signed map (within
    half a step of it). Refused, naming what, with a ``CheckpointError``: a map other than the dynamic one or
    blocks other than 256 (all bitsandbytes reads), ``maximize`` or master weights (bitsandbytes has
    neither), RMSprop with momentum (two states; bitsandbytes' keeps one), other group sizes.
    """
    rule = getattr(optimizer, "rule", None)
    if rule is None or not callable(getattr(bnb_optimizer, "load_state_dict", None)):
        raise CheckpointError(f"to_bitsandbytes(optimizer, bnb_optimizer) takes a dist8 optimizer and a bitsandbytes one, "
                              f"got {type(optimizer).__name__} and {type(bnb_optimizer).__name__} (a ShardedOptimizer: "
                              "built with full_state_dict=True, load its state_dict() into a plain dist8 optimizer first)")
    if optimizer.quant_map != "dynamic" or optimizer.block_size != 256:
        raise CheckpointError(f"bitsandbytes reads the dynamic map in blocks of 256; this optimizer writes "
                              f"quant_map={optimizer.quant_map!r} in blocks of {optimizer.block_size}")
    if rule == Rule.RMSPROP_MOMENTUM:
        raise CheckpointError("RMSprop with momentum keeps a momentum buffer that bitsandbytes' RMSprop8bit has not")
    mine, theirs = optimizer.state_dict(), bnb_optimizer.state_dict()
    sizes = [[len(g["params"]) for g in d["param_groups"]] for d in (mine, theirs)]
    if sizes[0] != sizes[1]:
        raise CheckpointError(f"parameter groups of sizes {sizes[0]} (dist8) and {sizes[1]} (bitsandbytes) differ")
    for gi, g in enumerate(mine["param_groups"]):
        if g.get("maximize"):
            raise CheckpointError(f"param group {gi} has maximize=True, which bitsandbytes does not have")
    unorm = float(getattr(getattr(bnb_optimizer, "args", None), "max_unorm", 0.0) or 0.0) > 0
    out_state = {}
    for pid, st in mine["state"].items():
        if CORRECTION in st:
            raise CheckpointError(f"parameter {pid} has a master-weight correction, which bitsandbytes does not keep")
        quant: dict[str, torch.Tensor] = {}
        for i in state_indices(rule):
            s = st.get(f"state{i}")
            if not isinstance(s, torch.Tensor):
                continue
            if s.dtype != torch.uint8:
                quant[f"state{i}"] = s.float().clone()
                continue
            codes, absmax, signed = s, st[f"absmax{i}"].float(), _BNB_SIGNED[i]
            if is_signed(rule, i) != signed:
                codes, absmax = _requantize(codes, absmax, not signed, 256)
            quant.update({f"state{i}": codes.reshape(s.shape).clone(), f"absmax{i}": absmax.clone(),
                          f"qmap{i}": dynamic_map(signed)})
        if rule == Rule.ADEMAMIX and "state3" in quant:  # bitsandbytes stacks m1 and m2: (2, *param shape)
            quant["state1"] = torch.stack([quant["state1"], quant.pop("state3")])
            if "absmax3" in quant:
                quant["absmax1"] = torch.stack([quant["absmax1"], quant.pop("absmax3")])
                quant.pop("qmap3")
        if isinstance(st.get(GNORM), torch.Tensor):
            quant["gnorm_vec"] = st[GNORM].clone()
        if unorm:
            quant["unorm_vec"] = torch.zeros(1)  # scratch of bitsandbytes' max_unorm, made only by its init
        out_state[pid] = {"step": checked_step(st.get("step", 0), str(pid), CheckpointError), BNB_WRAPPER: quant}
    groups = []
    for g_mine, g_theirs in zip(mine["param_groups"], theirs["param_groups"]):
        g = dict(g_theirs, lr=g_mine["lr"])
        if "initial_lr" in g_mine:
            g["initial_lr"] = g_mine["initial_lr"]
        groups.append(g)
    return {"state": out_state, "param_groups": groups}


def _check_structure(state_dict: Any) -> None:
    """An optimizer state dict's outline: a dict with a dict ``state`` of per-parameter dicts and a
    list ``param_groups``; anything else is refused naming what is wrong."""
    if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) \
            or not isinstance(state_dict.get("param_groups"), list):
        raise CheckpointError("not an optimizer state dict: expected a dict with a dict 'state' and a list "
                              "'param_groups'")
    for pid, st in state_dict["state"].items():
        if not isinstance(st, dict):
            raise CheckpointError(f"parameter {pid}: state must be a dict, got {type(st).__name__}")


def _unstack_ademamix(pid: Any, st: dict[str, Any]) -> dict[str, Any]:
    """bitsandbytes AdEMAMix's ``state1`` of shape (2, *param shape) (m1, m2; ``absmax1`` (2, blocks) when
    8-bit) as dist8's ``state1`` = m1 and ``state3`` = m2 (state2's shape); other states unchanged."""
    s1, s2 = st.get("state1"), st.get("state2")
    if not (torch.is_tensor(s1) and s1.dim() >= 2 and s1.shape[0] == 2 and torch.is_tensor(s2)
            and s1[0].numel() == s2.numel() and (s1.dim() == 2 or s1.shape[1:] == s2.shape)):
        return st
    if "state3" in st:
        raise CheckpointError(f"parameter {pid}: a stacked (2, ...) state1 next to a state3 is not a bitsandbytes "
                              "AdEMAMix state")
    st = dict(st, state1=s1[0].reshape(s2.shape).contiguous(), state3=s1[1].reshape(s2.shape).contiguous())
    a1 = st.get("absmax1")
    if torch.is_tensor(a1):
        if a1.dim() != 2 or a1.shape[0] != 2:
            raise CheckpointError(f"parameter {pid}: AdEMAMix absmax1 must be (2, blocks), got {tuple(a1.shape)}")
        st.update(absmax1=a1[0].contiguous(), absmax3=a1[1].contiguous())
    return st


def export_fp32_adam(state_dict: dict[str, Any], block_size: int = 256) -> dict[str, Any]:
    """Dequantize an (Adam/AdamW-family) dist8 ``state_dict`` into torch.optim.AdamW's layout.

    ``state1 -> exp_avg``, ``state2 -> exp_avg_sq`` (fp32), ``step`` as a float tensor. 8-bit
    codes are read with the map the state dict names (``state_dict["dist8"]["quant_map"]``;
    the dynamic map when it names none) and ``block_size``, and ``exp_avg_sq`` as the optimizer
    reads it: a code 0 is half the smallest code of its block, not 0 (a zero second moment
    under a nonzero first moment is the ``lr * m / eps`` step the floor exists to prevent).
    """
    _check_structure(state_dict)
    info = state_dict.get(STATE_DICT_INFO)
    quant_map = info.get("quant_map", "dynamic") if isinstance(info, dict) else "dynamic"
    out = {}
    for pid, st in state_dict["state"].items():
        if not st:  # no state: what reading optimizer.state[p] before p's first step leaves
            out[pid] = {}
            continue
        step = checked_step(st.get("step", 0), str(pid), CheckpointError)
        entry: dict[str, Any] = {"step": torch.tensor(float(step))}
        for i, key, signed in ((1, "exp_avg", True), (2, "exp_avg_sq", False)):
            s = st.get(f"state{i}")
            if not isinstance(s, torch.Tensor):
                raise CheckpointError(f"parameter {pid}: no tensor state{i} ({key}); export_fp32_adam needs an "
                                      "Adam-family state (state1 = m, state2 = v), not Lion's, SGD's, ...")
            if s.dtype != torch.uint8:
                entry[key] = s.float().clone()
                continue
            absmax = st.get(f"absmax{i}")
            if not isinstance(absmax, torch.Tensor):
                raise CheckpointError(f"parameter {pid}: 8-bit state{i} has no tensor absmax{i}")
            qmap, absmax = get_map(quant_map, signed).to(s.device), absmax.float().to(s.device)
            if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
                raise CheckpointError(f"parameter {pid}: absmax{i} holds NaN, inf or negative values")
            try:
                entry[key] = read_state(s, absmax, qmap, block_size, state_floored(Rule.ADAM, i - 1)).view(s.shape)
            except ValueError as exc:
                raise CheckpointError(f"parameter {pid}: {exc}") from None
        out[pid] = entry
    groups = []
    for g in state_dict["param_groups"]:
        keep = {k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "params") if k in g}
        keep.update(amsgrad=False, maximize=bool(g.get("maximize", False)), foreach=None, capturable=False,
                    differentiable=False, fused=None)
        groups.append(keep)
    return {"state": out, "param_groups": groups}


def fp32_weights(model_tensors: dict[str, torch.Tensor], merged: dict[str, torch.Tensor],
                 where: str) -> dict[str, torch.Tensor]:
    """The model with fp32 masters: ``decode_master(param, correction)`` where the optimizer tensors
    ``merged`` (``"<param>::correction"``, whole parameters) hold a correction, ``float()`` elsewhere.

    ``where`` names the checkpoint in errors (a correction whose parameter is not a bf16/fp16
    model tensor of the same number of elements is refused).
    """
    from dist8.optim.state_schema import CORRECTION
    from dist8.quant.master import decode_master

    out = {}
    for name, value in model_tensors.items():
        correction = merged.get(tensor_key(name, CORRECTION))
        if correction is None:
            out[name] = value.float() if value.is_floating_point() else value
            continue
        if value.dtype not in (torch.bfloat16, torch.float16) or correction.numel() != value.numel():
            raise CheckpointError(f"{where}: {name}::{CORRECTION} ({correction.dtype}, {correction.numel()} values) "
                                  f"does not fit model tensor {name} ({value.dtype}, {value.numel()} values)")
        try:
            out[name] = decode_master(value, correction.view(value.shape))
        except ValueError as exc:
            raise CheckpointError(f"{where}: {name}::{CORRECTION}: {exc}") from None
    return out


def consolidate(path: str | os.PathLike, out: str | os.PathLike, *, force: bool = False,
                fp32_weights_file: bool = False) -> str:
    """Rewrite checkpoint ``path`` as a world-size-1 checkpoint in ``out`` (one optimizer file).

    ``path`` is read as :func:`dist8.checkpoint.load` reads it (every file verified, the param groups
    checked as ``dist8 ckpt verify`` checks them, every tensor through the one reader,
    :func:`~dist8.checkpoint.reader.read_whole`): what ``load`` refuses is refused, not rewritten as a
    fresh, hash-stamped checkpoint. Version 1 is written as version 2, its state keys declared.
    ``out`` is checked first (:func:`~dist8.checkpoint.dirs.check_output_dir`): a non-empty directory
    is refused unless ``force`` (then it is replaced atomically: the old one is removed only after the
    new one is in place); a file or symlink, a path that cannot be created, and an ``out`` that is
    ``path``, holds it, lies inside it or would remove it (``path`` at ``out``'s temporary or kept-aside
    name) are refused whatever ``force``.
    ``fp32_weights_file``: also write ``model-fp32.safetensors``, the model with its fp32 master
    weights (:func:`fp32_weights`: bf16/fp16 parameters decoded with their ``master_weight_bits``
    correction, everything else cast to fp32), listed and hashed in the metadata like every file.
    """
    path, out = Path(path), Path(out)
    check_output_dir(out, force, reading=path)
    meta = read_metadata(path)
    verify_files(path, meta)
    if fp32_weights_file and MODEL_FILE not in meta["files"]:
        raise CheckpointError(f"{path}: --fp32-weights needs the model, but the checkpoint has no {MODEL_FILE}")
    check_saved_groups(meta["optimizer"]["param_groups"], str(path / METADATA))
    states = read_whole(path, meta, verify=False)  # hashes checked just above
    merged = {tensor_key(name, k): v for name, st in states.items() for k, v in st.items() if k != "step"}
    tmp = temp_dir(out)
    try:
        files = _write_consolidated(path, meta, merged, tmp, fp32_weights_file)
        write_metadata(tmp, dict(meta, world_size=1, pieces={"0": _whole_pieces(meta)}, files=files,
                                 params=_declared_params(meta, states), consolidated_from=meta["world_size"]))
        install_dir(tmp, out)
    except OSError as exc:
        raise CheckpointError(f"writing {out} failed: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _write_consolidated(path: Path, meta: dict[str, Any], merged: dict[str, torch.Tensor], tmp: Path,
                        fp32_weights_file: bool) -> dict[str, Any]:
    """The files of the consolidated checkpoint in ``tmp``; returns their ``files`` entries."""
    fname = rank_file(0, 1)
    save_file(merged, str(tmp / fname), metadata={"format": FORMAT})
    files = {fname: file_entry(tmp / fname)}
    if MODEL_FILE in meta["files"]:
        shutil.copyfile(path / MODEL_FILE, tmp / MODEL_FILE)
        files[MODEL_FILE] = meta["files"][MODEL_FILE]
    if fp32_weights_file:
        from dist8.checkpoint.model_file import read_model_file, write_model_file

        stored, aliases = read_model_file(path / MODEL_FILE, expand=False)  # a tied weight decoded once
        weights = fp32_weights(stored, merged, str(path))
        write_model_file(tmp / FP32_WEIGHTS_FILE, weights, {"format": FORMAT}, aliases=aliases)
        files[FP32_WEIGHTS_FILE] = file_entry(tmp / FP32_WEIGHTS_FILE)
    return files


def _whole_pieces(meta: dict[str, Any]) -> list[list]:
    """World size 1's pieces: each parameter saved in pieces, whole, at its (agreed) step."""
    steps = {name: step for plist in meta["pieces"].values() for name, _s, _e, step in plist}
    return [[p["name"], 0, math.prod(p["shape"]), steps[p["name"]]] for p in meta["params"] if p["name"] in steps]


def _declared_params(meta: dict[str, Any], states: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """``params`` with every state key declared: a version 1 entry (``state`` None) gets what was read."""
    def declared(p: dict[str, Any]) -> dict[str, str]:
        if p["state"] is not None:
            return p["state"]
        st = states.get(p["name"], {})
        return {k: str(v.dtype).split(".")[-1] for k, v in st.items() if torch.is_tensor(v)}

    return [dict(p, state=declared(p)) for p in meta["params"]]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Summary used by ``dist8 ckpt info``: params with bytes per parameter and totals.

    Reads only metadata and safetensors headers, through :mod:`dist8.checkpoint.files`
    (plain names inside the directory, regular files, bounded header length).
    """
    meta = read_metadata(path)
    sizes: dict[str, int] = {}
    for fname in meta["files"]:
        if fname in (MODEL_FILE, FP32_WEIGHTS_FILE):
            continue
        header = safetensors_header(member(path, fname, str(Path(path) / METADATA)))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            name = split_tensor_key(key)[0]
            a, b = info["data_offsets"]
            sizes[name] = sizes.get(name, 0) + b - a
    return {"meta": meta, "state_bytes": sizes}
