"""Resume a DeepSpeed engine from a dist8 checkpoint, at any world size and ZeRO stage.

Public as :func:`dist8.integrations.deepspeed.load_dist8_checkpoint`.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from deepspeed.runtime.engine import DeepSpeedEngine

__all__ = ["load_dist8_checkpoint"]


def load_dist8_checkpoint(engine: DeepSpeedEngine, path: str | os.PathLike, *,
                          load_model: bool = True) -> dict[str, Any]:
    """Load a dist8 checkpoint (e.g. from ``dist8 ckpt from-deepspeed``) into a DeepSpeed ``engine``.

    Works at any world size and ZeRO stage: every rank reads the whole-parameter state and
    keeps its own ranges. Returns the checkpoint's ``extra`` dict; sets ``engine.global_steps``
    from the checkpoint's step. Segment ranges that do not start on a block boundary of the
    parameter are requantized (dequantize, re-slice, quantize); aligned ones are exact.

    Args:
        engine: a DeepSpeed engine whose optimizer dist8 set up (a ``dist8.*`` config type, or a dist8
            optimizer passed to :func:`~dist8.integrations.deepspeed.initialize`; anything else raises
            ``TypeError``), of the checkpoint's optimizer class and quantization map.
        path: a dist8 checkpoint directory (:func:`dist8.checkpoint.save`, ``dist8 ckpt from-deepspeed``).
        load_model: also copy the checkpoint's ``model.safetensors`` weights into the engine's model
            and the optimizer's fp32 partitions (skipped when the checkpoint has none). Default True.
    """
    import math

    from dist8.checkpoint.format import MODEL_FILE, CheckpointError, read_metadata, verify_files
    from dist8.checkpoint.groups import checked_groups
    from dist8.checkpoint.io import read_pieces
    from dist8.integrations.deepspeed_segments import DeepSpeedSegments
    from dist8.kernels import RULE_STATES
    from dist8.quant import dequantize_blockwise, get_map, quantize_blockwise

    opt = engine.basic_optimizer
    if not isinstance(opt, DeepSpeedSegments):
        raise TypeError(f"engine's optimizer is {type(opt).__name__}, not a dist8 optimizer built from a "
                        "'dist8.*' DeepSpeed config")
    path = os.fspath(path)
    meta = read_metadata(path)
    where = os.path.join(path, "metadata.json")
    saved_opt = meta["optimizer"]
    for what, saved_value, mine in (("class", saved_opt["class"], type(opt).__name__),
                                    ("quant_map", saved_opt["quant_map"], opt.quant_map)):
        if saved_value != mine:
            raise CheckpointError(f"{where}: saved with {what}={saved_value!r}, the engine's optimizer uses "
                                  f"{what}={mine!r}")
    groups = checked_groups(saved_opt["param_groups"], opt.param_groups[:len(saved_opt["param_groups"])], where,
                            opt.validate_hyper)
    shapes = {p["name"]: p["shape"] for p in meta["params"]}
    blocks = {p["name"]: p["block_size"] for p in meta["params"]}
    states = read_pieces(path, meta, {n: (0, math.prod(s)) for n, s in shapes.items()}, opt.rule)
    signs = RULE_STATES[opt.rule]
    qmaps = {s: get_map(opt.quant_map, s) for s in (True, False)}

    def full_state(name: str) -> dict[str, Any] | None:
        """Whole-parameter state of ``name``: fp32 state tensors (dequantized) + step + 8-bit flag."""
        st = states.get(name)
        if st is None:
            return None
        out: dict[str, Any] = {"step": st["step"]}
        for i in range(1, len(signs) + 1):
            s = st[f"state{i}"]
            out[f"8bit{i}"] = s.dtype == torch.uint8
            if s.dtype == torch.uint8:
                s = dequantize_blockwise(s, st[f"absmax{i}"], qmaps[signs[i - 1]], blocks[name])
            out[f"state{i}"] = s.reshape(-1).float()
        if "gnorm_vec" in st:
            out["gnorm_vec"] = st["gnorm_vec"]
        return out

    model_sd = None
    if load_model and MODEL_FILE in meta["files"]:
        from dist8.checkpoint.reader import read_model_tensors

        verify_files(path, meta, [MODEL_FILE])
        model_sd = read_model_tensors(os.path.join(path, MODEL_FILE))
        for name, p in engine.module.named_parameters():
            if name in model_sd and model_sd[name].numel() != getattr(p, "ds_numel", p.numel()):
                raise CheckpointError(f"{os.path.join(path, MODEL_FILE)}: {name} has {model_sd[name].numel()} "
                                      f"elements, the model {getattr(p, 'ds_numel', p.numel())}")

    segs_of = getattr(opt, "ds_segments", {}) or {}
    cache: dict[str, Any] = {}

    def cached(name):
        if name not in cache:
            cache[name] = full_state(name)
        return cache[name]

    def make_state(full, a, n, device, settings):
        st: dict[str, Any] = {"step": int(full["step"])}
        for i in range(1, len(signs) + 1):
            piece = full[f"state{i}"][a:a + n]
            if settings.use_8bit:
                codes, absmax = quantize_blockwise(piece, qmaps[signs[i - 1]], settings.block_size)
                st[f"state{i}"], st[f"absmax{i}"] = codes.to(device), absmax.to(device)
            else:
                st[f"state{i}"] = piece.clone().to(device)
        if "gnorm_vec" in full:
            st["gnorm_vec"] = full["gnorm_vec"].to(device)
        return st

    names = {p: n for n, p in engine.module.named_parameters()}
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                segs = segs_of.get(p)
                if segs is None:  # the optimizer holds a whole model parameter (no ZeRO)
                    name = opt.param_names.get(p, names.get(p))
                    if model_sd is not None and name in model_sd:
                        p.copy_(model_sd[name].view(p.shape))
                    full = cached(name) if name else None
                    if full is not None:
                        settings = opt.settings(p, group)
                        st = make_state(full, 0, p.numel(), p.device, settings)
                        st = {k: (v.view(p.shape) if k.startswith("state") else v) for k, v in st.items()}
                        opt.state[p] = opt.check_state(p, st, block_size=settings.block_size)
                    continue
                seg_states = []
                for seg in segs:
                    view = opt.segment_view(p, seg)
                    if model_sd is not None and seg.name in model_sd:
                        view.copy_(model_sd[seg.name].reshape(-1)[seg.param_start:seg.param_start + seg.numel])
                    full = cached(seg.name)
                    if full is None:
                        seg_states.append(None)
                        continue
                    settings = opt.segment_settings(seg, group)
                    st = make_state(full, seg.param_start, seg.numel, p.device, settings)
                    seg_states.append(opt.check_state(view, st, block_size=settings.block_size))
                opt.state[p] = {"step": max([s["step"] for s in seg_states if s], default=0), "segments": seg_states,
                                "segment_names": [s.name for s in segs],
                                "segment_starts": [s.param_start for s in segs],
                                "segment_shapes": [list(s.shape) for s in segs]}
        if model_sd is not None:
            _copy_model_weights(engine, model_sd)
    for group, values in zip(opt.param_groups, groups):
        group.update(values)
    opt.recheck_settings()  # the next step checks the loaded state against the settings, on every rank
    if meta.get("step") is not None:
        engine.global_steps = int(meta["step"])
    return meta.get("extra", {})


def _copy_model_weights(engine, model_sd: dict[str, torch.Tensor]) -> None:
    """Write full fp32 weights into the engine's low-precision/partitioned model parameters."""
    from dist8.integrations.deepspeed_segments import dp_rank

    for name, p in engine.module.named_parameters():
        if name not in model_sd:
            continue
        full = model_sd[name]
        if hasattr(p, "ds_tensor"):  # ZeRO-3: only this rank's partition is resident
            part = p.ds_tensor
            pn = part.ds_numel
            start = dp_rank(getattr(engine.optimizer, "dp_process_group", None)) * pn
            real = max(0, min(pn, p.ds_numel - start))
            if real:
                part.view(-1)[:real].copy_(full.reshape(-1)[start:start + real].to(part.dtype))
        else:
            p.data.copy_(full.view(p.shape).to(p.dtype))
