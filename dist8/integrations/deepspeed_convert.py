"""``dist8 ckpt from-deepspeed DIR OUT``: a DeepSpeed checkpoint of a ``dist8.*`` optimizer -> dist8's format.

DeepSpeed's own checkpoints only load at the world size they were saved at. This
converter reads every rank's optimizer file (ZeRO 0/1/2/3, with or without CPU
offload), reassembles each parameter's 8-bit state from the per-parameter segments
that :mod:`dist8.integrations.deepspeed` stores, re-blocks it on the whole parameter
(dequantize + quantize; blocks that were already aligned come back unchanged) and
writes a world-size-1 dist8 checkpoint with ``model.safetensors`` holding the fp32
weights (DeepSpeed's ``zero_to_fp32`` for ZeRO, the module state otherwise). Load it at
any world size: :func:`dist8.integrations.deepspeed.load_dist8_checkpoint` (DeepSpeed),
or :func:`dist8.checkpoint.load` (plain dist8 / ShardedOptimizer).
"""
from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any

import torch

from dist8.optim.config import hyperparameters_of

__all__ = ["from_deepspeed", "register_cli", "deepspeed_safe_globals"]

# "module:qualname" of the non-tensor classes DeepSpeed puts into its checkpoints (found by loading real
# ZeRO 0/2/3 checkpoints with weights_only=True); nothing else may be unpickled.
_DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
)


def deepspeed_safe_globals() -> list:
    """The DeepSpeed classes ``torch.load(weights_only=True)`` may rebuild from a DeepSpeed checkpoint."""
    import importlib

    out = []
    for spec in _DEEPSPEED_GLOBALS:
        module, _, name = spec.partition(":")
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # another DeepSpeed version: the class does not exist, so no file can need it
    return out


def _find_base_state(obj: Any, depth: int = 0) -> dict | None:
    """The dist8 optimizer state dict inside a DeepSpeed optimizer checkpoint entry."""
    if isinstance(obj, dict):
        if "state" in obj and "param_groups" in obj:
            return obj
        if depth < 3:
            for key in ("base_optimizer_state", "optimizer_state_dict", "optimizer"):
                if key in obj:
                    found = _find_base_state(obj[key], depth + 1)
                    if found is not None:
                        return found
    return None


def _holds_states(directory: Path) -> bool:
    return any(directory.glob("mp_rank_*_model_states.pt")) or any(directory.glob("zero_pp_rank_*_model_states.pt"))


def _tag(ckpt_dir: Path, tag: str | None) -> tuple[Path, str]:
    """(DeepSpeed root, tag): ``ckpt_dir`` may be the root (holding ``latest``) or the tag directory itself."""
    from dist8.checkpoint.files import check_name, member, read_text
    from dist8.checkpoint.format import CheckpointError

    if tag is None and _holds_states(ckpt_dir):
        return ckpt_dir.parent, ckpt_dir.name
    if tag is None:
        latest = ckpt_dir / "latest"
        if os.path.lexists(latest):
            tag = read_text(member(ckpt_dir, "latest", str(ckpt_dir)), limit=4096).strip()
        else:
            subdirs = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and _holds_states(p))
            if len(subdirs) != 1:
                raise CheckpointError(f"{ckpt_dir}: no 'latest' file and {len(subdirs)} tag directories "
                                      f"{subdirs[:10]}; pass --tag or the tag directory itself")
            tag = subdirs[0]
    check_name(tag, f"{ckpt_dir}: tag")
    member(ckpt_dir, tag, f"{ckpt_dir}: tag", kind="dir")
    return ckpt_dir, tag


def from_deepspeed(ckpt_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None = None, *,
                   force: bool = False) -> str:
    """Convert DeepSpeed checkpoint ``ckpt_dir`` (tag ``tag``, default ``latest``) to dist8 checkpoint ``out``.

    ``ckpt_dir`` may also be the tag directory holding the ``mp_rank_*`` files. Files are read
    with ``torch.load(weights_only=True)`` and an allowlist of DeepSpeed classes: nothing is
    unpickled that could run code. Any malformed input raises CheckpointError naming the directory.
    A non-empty ``out`` is refused unless ``force``; an ``out`` that is, holds or lies inside
    ``ckpt_dir`` is refused.
    """
    from dist8.checkpoint.format import CheckpointError, check_output_dir

    check_output_dir(Path(out), force, reading=Path(ckpt_dir))
    try:
        return _convert(ckpt_dir, out, tag)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        raise CheckpointError(f"{ckpt_dir}: not a readable DeepSpeed checkpoint of a dist8 optimizer "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None


def _convert(ckpt_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None) -> str:
    from safetensors.torch import save_file

    from dist8.version import __version__
    from dist8.checkpoint.model_file import write_model_file
    from dist8.checkpoint.format import (FORMAT, MODEL_FILE, CheckpointError, file_entry, install_dir,
                                         metadata_param_groups, rank_file,
                                         temp_dir, tensor_key, write_metadata)
    from dist8.checkpoint.torch_files import load_torch_file, weights_only_loads
    from dist8.kernels import RULE_STATES, Rule
    from dist8.optim import get_optimizer_class
    from dist8.quant import MAP_NAMES, dequantize_blockwise, get_map, num_blocks, quantize_blockwise

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint directory {ckpt_dir} does not exist")
    ckpt_dir, tag = _tag(ckpt_dir, tag)
    tdir = ckpt_dir / tag
    allowed = deepspeed_safe_globals()
    # ZeRO 0-2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt per rank.
    model_files = sorted(glob.glob(str(tdir / "mp_rank_*_model_states.pt")))
    if not model_files:
        model_files = sorted(glob.glob(str(tdir / "zero_pp_rank_0_mp_rank_*_model_states.pt")))
    if not model_files:
        raise CheckpointError(f"{tdir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    if len(model_files) > 1:
        raise CheckpointError(f"{tdir}: {len(model_files)} model-parallel ranks; only data parallelism is supported")
    model_states = load_torch_file(model_files[0], allowed)
    if not isinstance(model_states, dict):
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states dict")
    optim_files = sorted(glob.glob(str(tdir / "*zero_pp_rank_*_optim_states.pt")),
                         key=lambda f: int(os.path.basename(f).split("zero_pp_rank_")[1].split("_")[0]))
    rank_states = []
    for f in optim_files:
        sd = load_torch_file(f, allowed)
        base = _find_base_state(sd.get("optimizer_state_dict", sd)) if isinstance(sd, dict) else None
        if base is None:
            raise CheckpointError(f"{f}: no optimizer state dict found")
        rank_states.append((f, base))
    zero = bool(rank_states)
    if not zero:
        base = _find_base_state(model_states.get("optimizer"))
        if base is None:
            raise CheckpointError(f"{model_files[0]}: no optimizer state (saved without the optimizer?)")
        rank_states.append((model_files[0], base))

    info = rank_states[0][1].get("dist8")
    if info is None:
        raise CheckpointError(f"{rank_states[0][0]}: optimizer state was not written by a dist8 optimizer "
                              "(DeepSpeed config optimizer.type must be 'dist8.<Name>')")
    cls = get_optimizer_class(info["class"])
    B = int(info["block_size"])
    rule = Rule[info["rule"]] if info.get("rule") in Rule.__members__ else cls.rule  # older saves: the class's
    signs = RULE_STATES[rule]
    quant_map = info.get("quant_map", "dynamic")  # recorded since the fp8 map; older saves: the default
    if quant_map not in MAP_NAMES:
        raise CheckpointError(f"{rank_states[0][0]}: optimizer state names quant_map={quant_map!r}, "
                              f"not one of {', '.join(MAP_NAMES)}")
    qmaps = {s: get_map(quant_map, s) for s in (True, False)}

    # Model weights (fp32): ZeRO -> zero_to_fp32 (master weights); stage 0 -> the module state.
    if zero:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(allowed):  # zero_to_fp32 asks torch.load for weights_only=False
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    else:
        weights = model_states["module"]
    weights = {k: v.detach().float().contiguous() for k, v in weights.items()}
    param_shapes: dict[str, tuple[int, ...]] = {}
    for entry in model_states.get("param_shapes") or []:
        for n, s in entry.items():
            param_shapes[n] = tuple(s)
    if not param_shapes:
        param_shapes = {n: tuple(v.shape) for n, v in weights.items()}

    # Collect per-parameter pieces of dequantized state.
    full: dict[str, dict[str, Any]] = {}

    def put(name, shape, start, st):
        numel = math.prod(shape)
        entry = full.setdefault(name, {"shape": tuple(shape), "step": 0, "8bit": False, "covered": 0,
                                       **{f"state{i}": torch.zeros(numel) for i in range(1, len(signs) + 1)}})
        for i in range(1, len(signs) + 1):
            s = st[f"state{i}"]
            if s.dtype == torch.uint8:
                entry["8bit"] = True
                s = dequantize_blockwise(s.reshape(-1), st[f"absmax{i}"].float(), qmaps[signs[i - 1]], B)
            s = s.reshape(-1).float()
            entry[f"state{i}"][start:start + s.numel()] = s
        entry["covered"] += st["state1"].numel()
        entry["step"] = max(entry["step"], int(st.get("step", 0)))
        if "gnorm_vec" in st:
            entry["gnorm_vec"] = st["gnorm_vec"].float()

    groups_hyper = None
    for fname, base in rank_states:
        names = base.get("dist8", {}).get("names", {})
        if groups_hyper is None:
            groups_hyper = [hyperparameters_of(g) for g in base["param_groups"]]
        for pid, st in base["state"].items():
            if "segments" in st:
                for name, start, shape, seg in zip(st["segment_names"], st["segment_starts"], st["segment_shapes"],
                                                   st["segments"]):
                    if seg is not None:
                        put(name, tuple(shape), int(start), seg)
            elif "state1" in st:
                name = names.get(pid)
                if name is None:
                    raise CheckpointError(f"{fname}: optimizer state {pid} has no parameter name")
                put(name, tuple(st["state1"].shape), 0, st)
    for name, entry in full.items():
        if entry["covered"] != math.prod(entry["shape"]):
            raise CheckpointError(f"{ckpt_dir}: state of parameter {name} covers {entry['covered']} of "
                                  f"{math.prod(entry['shape'])} elements (missing rank files?)")

    # Write the dist8 checkpoint (world size 1; loads at any world size).
    names_in_order = [n for n in param_shapes if n in weights] or list(weights)
    tensors: dict[str, torch.Tensor] = {}
    pieces = []
    params_meta = []
    block = 0
    step = max([e["step"] for e in full.values()], default=0)
    for name in names_in_order:
        shape = tuple(weights[name].shape)
        numel = math.prod(shape)
        nb = num_blocks(numel, B)
        params_meta.append({"name": name, "shape": list(shape), "dtype": "float32", "first_block": block,
                            "n_blocks": nb, "group": 0, "block_size": B, "state": {}})
        block += nb
        entry = full.get(name)
        if entry is None:
            if numel:
                pieces.append([name, 0, numel, 0])  # never stepped: no state
            continue
        for i in range(1, len(signs) + 1):
            vals = entry[f"state{i}"]
            if entry["8bit"]:
                codes, absmax = quantize_blockwise(vals, qmaps[signs[i - 1]], B)
                tensors[tensor_key(name, f"state{i}")] = codes.contiguous()
                tensors[tensor_key(name, f"absmax{i}")] = absmax.contiguous()
            else:
                tensors[tensor_key(name, f"state{i}")] = vals.contiguous()
        if "gnorm_vec" in entry:
            tensors[tensor_key(name, "gnorm_vec")] = entry["gnorm_vec"].contiguous()
        pieces.append([name, 0, numel, entry["step"]])
        params_meta[-1]["state"] = {k.split("::")[-1]: str(v.dtype).split(".")[-1] for k, v in tensors.items()
                                    if k.rpartition("::")[0] == name}
    groups_meta = metadata_param_groups((groups_hyper or [])[:1])  # refused before any file is written
    tmp = temp_dir(out)
    fname = rank_file(0, 1)
    save_file(tensors, str(tmp / fname), metadata={"format": FORMAT})
    write_model_file(tmp / MODEL_FILE, {n: weights[n] for n in names_in_order}, {"format": FORMAT})
    files = {f: file_entry(tmp / f) for f in (fname, MODEL_FILE)}

    meta = {
        "dist8_version": __version__,
        "torch_version": torch.__version__, "block_size": B, "world_size": 1, "step": step,
        "optimizer": {"class": cls.__name__, "rule": rule.name, "quant_map": quant_map, "block_wise": True,
                      "param_groups": groups_meta},
        "params": params_meta, "pieces": {"0": pieces}, "files": files,
        "extra": {"converted_from": "deepspeed", "deepspeed_dir": str(ckpt_dir), "tag": tag,
                  "deepspeed_world_size": len(rank_states) if zero else 1,
                  "global_steps": model_states.get("global_steps"),
                  "global_samples": model_states.get("global_samples")},
    }
    write_metadata(tmp, meta)
    install_dir(tmp, out)
    return str(out)


def _cli(args) -> int:
    out = from_deepspeed(args.path, args.out, tag=args.tag, force=args.force)
    print(f"wrote {out} (dist8 checkpoint, loads at any world size)")
    return 0


def register_cli(sub, guard=None) -> None:
    """Add ``from-deepspeed`` to the ``dist8 ckpt`` sub-parsers ``sub``."""
    p = sub.add_parser("from-deepspeed", help="convert a DeepSpeed checkpoint of a dist8.* optimizer "
                                              "to a dist8 checkpoint (any world size)")
    p.add_argument("path", help="DeepSpeed checkpoint directory (the one holding 'latest', or a tag directory "
                                "holding the mp_rank_* files)")
    p.add_argument("out", help="output dist8 checkpoint directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the 'latest' file)")
    p.add_argument("--force", action="store_true", help="replace a non-empty OUT (after the new one is written)")
    p.set_defaults(func=guard(_cli) if guard else _cli)
