"""``dist8 ckpt from-deepspeed DIR OUT``: a DeepSpeed checkpoint of a ``dist8.*`` optimizer -> dist8's format.
(One concern: that conversion, from reading DeepSpeed's files safely to writing the dist8 checkpoint.)

DeepSpeed's own checkpoints only load at the world size they were saved at. This
converter reads every rank's optimizer file (ZeRO 0/1/2/3, with or without CPU
offload), reassembles each parameter's 8-bit state from the per-parameter segments
that :mod:`dist8.integrations.deepspeed` stores, re-blocks it on the whole parameter
(dequantize + quantize; blocks that were already aligned come back unchanged) and
writes a world-size-1 dist8 checkpoint with ``model.safetensors`` holding the fp32
weights (DeepSpeed's ``zero_to_fp32`` for ZeRO, the module state otherwise). Load it at
any world size: :func:`dist8.integrations.deepspeed.load_dist8_checkpoint` (DeepSpeed),
or :func:`dist8.checkpoint.load` (plain dist8 / ShardedOptimizer).

Every input is checked before anything is written: the files DeepSpeed's ``zero_to_fp32`` will open are
checked as dist8 reads its own (regular files inside the tag directory, ``weights_only`` loads); the saved
class, block size, map, rule and param groups go through the optimizer class's own construction and
``validate_hyper``; each piece of state through ``state_schema.check_state`` (what ``load_state_dict``
uses), its start and shape against the parameter, and the pieces must cover every element exactly once
(:mod:`dist8.integrations.deepspeed_state_pieces`).
"""
from __future__ import annotations

import glob
import inspect
import math
import numbers
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist8.integrations.deepspeed_state_pieces import StateAssembly, add_rank_state, is_int, one_line
from dist8.messages import brief
from dist8.optim.config import hyperparameters_of

if TYPE_CHECKING:
    from dist8.optim import Optimizer8bit

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
    unpickled that could run code. Any malformed input raises CheckpointError naming the directory,
    file or key, before anything is written. A non-empty ``out`` is refused unless ``force``; an
    ``out`` that is, holds or lies inside ``ckpt_dir`` is refused.
    """
    from dist8.checkpoint.format import CheckpointError, check_output_dir

    check_output_dir(Path(out), force, reading=Path(ckpt_dir))
    try:
        return _convert(ckpt_dir, out, tag)
    except CheckpointError:
        raise
    # RuntimeError/OverflowError: torch's answer to values no check above foresaw; still one line, not a traceback
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{ckpt_dir}: not a readable DeepSpeed checkpoint of a dist8 optimizer "
                              f"({type(exc).__name__}: {one_line(exc)[:200]})") from None


def _convert(ckpt_dir: str | os.PathLike, out: str | os.PathLike, tag: str | None) -> str:
    from dist8.checkpoint.format import CheckpointError
    from dist8.optim import get_optimizer_class
    from dist8.optim.state_schema import STATE_DICT_INFO

    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"DeepSpeed checkpoint directory {ckpt_dir} does not exist")
    ckpt_dir, tag = _tag(ckpt_dir, tag)
    tdir = ckpt_dir / tag
    allowed = deepspeed_safe_globals()
    model_file, model_states = _read_model_states(tdir, allowed)
    rank_states = _read_rank_states(tdir, allowed)
    zero = bool(rank_states)
    if not zero:
        base = _find_base_state(model_states.get("optimizer"))
        if base is None:
            raise CheckpointError(f"{model_file}: no optimizer state (saved without the optimizer?)")
        rank_states.append((model_file, base))

    first_file, first = rank_states[0]
    info = first.get(STATE_DICT_INFO)
    if not isinstance(info, dict):
        raise CheckpointError(f"{first_file}: optimizer state was not written by a dist8 optimizer "
                              "(DeepSpeed config optimizer.type must be 'dist8.<Name>')")
    groups_hyper = [hyperparameters_of(g) for g in first["param_groups"]]
    opt = _checked_optimizer(get_optimizer_class(info["class"]), info, groups_hyper, first_file)

    # Every piece of state is checked against the parameter shapes before DeepSpeed's code reads anything more.
    shapes = _param_shapes(model_file, model_states, zero)
    assembly = StateAssembly(shapes, opt)
    for fname, base in rank_states:
        add_rank_state(assembly, fname, base)
    assembly.check_coverage(tdir)

    # Model weights (fp32): ZeRO -> zero_to_fp32 (master weights); stage 0 -> the module state.
    if zero:
        _check_zero_to_fp32_inputs(tdir, {Path(f) for f, _ in [*rank_states, (model_file, None)]}, allowed)
        weights = _zero_to_fp32_weights(ckpt_dir, tag, allowed)
    else:
        weights = model_states["module"]
    weights = {k: v.detach().float().contiguous() for k, v in weights.items()}
    entries = assembly.assemble(weights, f"{tdir}: zero_to_fp32" if zero else model_file)
    names_in_order = [n for n in shapes if n in weights] or list(weights)
    extra = {"converted_from": "deepspeed", "deepspeed_dir": str(ckpt_dir), "tag": tag,
             "deepspeed_world_size": len(rank_states) if zero else 1,
             **{key: _counter(model_states.get(key), key, model_file) for key in ("global_steps", "global_samples")}}
    return _write(out, opt, {n: weights[n] for n in names_in_order}, entries, groups_hyper, extra)


def _read_model_states(tdir: Path, allowed: list) -> tuple[str, dict]:
    """(file, contents) of the tag directory's one model-states file."""
    from dist8.checkpoint.format import CheckpointError
    from dist8.checkpoint.torch_files import load_torch_file

    here = glob.escape(str(tdir))
    # ZeRO 0-2: mp_rank_00_model_states.pt; ZeRO-3: zero_pp_rank_R_mp_rank_00_model_states.pt per rank.
    model_files = sorted(glob.glob(os.path.join(here, "mp_rank_*_model_states.pt")))
    if not model_files:
        model_files = sorted(glob.glob(os.path.join(here, "zero_pp_rank_0_mp_rank_*_model_states.pt")))
    if not model_files:
        raise CheckpointError(f"{tdir}: no mp_rank_*_model_states.pt (not a DeepSpeed checkpoint)")
    if len(model_files) > 1:
        raise CheckpointError(f"{tdir}: {len(model_files)} model-parallel ranks; only data parallelism is supported")
    model_states = load_torch_file(model_files[0], allowed)
    if not isinstance(model_states, dict):
        raise CheckpointError(f"{model_files[0]}: not a DeepSpeed model-states dict")
    return model_files[0], model_states


def _param_shapes(model_file: str, model_states: dict, zero: bool) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the trainable parameters: ZeRO's ``param_shapes`` (what zero_to_fp32 builds the
    weights from; one dict per param group), else the module state's tensors."""
    from dist8.checkpoint.format import CheckpointError

    if not zero:
        module = model_states.get("module")
        if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
            raise CheckpointError(f"{model_file}: 'module' is not a dict of tensors")
        return {n: tuple(v.shape) for n, v in module.items()}
    shapes: dict[str, tuple[int, ...]] = {}
    groups = model_states.get("param_shapes")
    for entry in groups if isinstance(groups, (list, tuple)) else [None]:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{model_file}: param_shapes must be a list of {{name: shape}} dicts, "
                                  f"got {brief(groups)}")
        for n, shape in entry.items():
            if not (isinstance(shape, (list, tuple)) and all(is_int(d) and d >= 0 for d in shape)):
                raise CheckpointError(f"{model_file}: param_shapes gives parameter {brief(n)} the shape {brief(shape)}")
            shapes[n] = tuple(int(d) for d in shape)
    return shapes


def _read_rank_states(tdir: Path, allowed: list) -> list[tuple[str, dict]]:
    """(file, dist8 optimizer state dict) of every ZeRO rank file, in rank order (none without ZeRO)."""
    from dist8.checkpoint.format import CheckpointError
    from dist8.checkpoint.torch_files import load_torch_file

    optim_files = sorted(glob.glob(os.path.join(glob.escape(str(tdir)), "*zero_pp_rank_*_optim_states.pt")),
                         key=lambda f: int(os.path.basename(f).split("zero_pp_rank_")[1].split("_")[0]))
    rank_states = []
    for f in optim_files:
        sd = load_torch_file(f, allowed)
        base = _find_base_state(sd.get("optimizer_state_dict", sd)) if isinstance(sd, dict) else None
        if base is None:
            raise CheckpointError(f"{f}: no optimizer state dict found")
        rank_states.append((f, base))
    return rank_states


def _constructor_arguments(cls: type[Optimizer8bit], hyper: dict[str, Any]) -> dict[str, Any]:
    """The entries of a saved param group that ``cls``'s constructor takes (not, e.g., a scheduler's
    ``initial_lr``). Every key of a dist8 group is a constructor argument of its class or of the base."""
    from dist8.optim import Optimizer8bit

    names = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(Optimizer8bit.__init__).parameters)
    names -= {"self", "params", "defaults", "args"}
    return {k: v for k, v in hyper.items() if k in names}


def _checked_optimizer(cls: type[Optimizer8bit], info: dict, groups_hyper: list[dict[str, Any]],
                       where: str) -> Optimizer8bit:
    """``cls`` built as the saved run built it, over one placeholder parameter: the saved block size and map
    and the first param group's constructor arguments. The class's own checks refuse what it would refuse
    at construction (naming the key), its ``validate_hyper`` checks every saved group, and the instance's
    rule is the one those settings give (RMSprop: with a momentum buffer or not), which the saved
    ``rule`` must be: the rule decides which states exist, and another one would drop or invent some."""
    from dist8.checkpoint.format import CheckpointError
    from dist8.quant import MAP_NAMES

    quant_map = info.get("quant_map", "dynamic")  # recorded since the fp8 map; older saves: the default
    if quant_map not in MAP_NAMES:
        raise CheckpointError(f"{where}: optimizer state names quant_map={quant_map!r}, "
                              f"not one of {', '.join(MAP_NAMES)}")
    first = groups_hyper[0] if groups_hyper else {}
    # master_weight_bits is refused over fp32 parameters only; the value itself is what is checked here
    dtype = torch.float32 if first.get("master_weight_bits") is None else torch.bfloat16
    placeholder = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    try:
        opt = cls([placeholder], block_size=info.get("block_size"), quant_map=quant_map,
                  **_constructor_arguments(cls, first))
        for gi, hyper in enumerate(groups_hyper):
            opt.validate_hyper(hyper, f"param group {gi}")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {cls.__name__} refuses the saved settings: {one_line(exc)}") from None
    saved_rule = info.get("rule")  # older saves: none, the class's
    if saved_rule is not None and saved_rule != opt.rule.name:
        raise CheckpointError(f"{where}: optimizer state says rule={saved_rule!r}, but {cls.__name__} with the saved "
                              f"settings uses {opt.rule.name} (state of another optimizer?)")
    return opt


# The files DeepSpeed's zero_to_fp32 opens: every match of these in the tag directory, found by its own glob.
_ZERO_TO_FP32_GLOBS = ("*_model_states.pt", "*_optim_states.pt")


def _check_zero_to_fp32_inputs(tdir: Path, read: set[Path], allowed: list) -> None:
    """Check every file zero_to_fp32 will ``torch.load``, as dist8 reads its own: inside the tag directory, a
    regular file (a FIFO there hung the conversion, a symlink was followed out of the directory) and
    loadable with ``weights_only`` (its own load of a crafted pickle ended in a multi-line traceback).
    Files in ``read`` were loaded that way already."""
    from dist8.checkpoint.files import member
    from dist8.checkpoint.format import CheckpointError
    from dist8.checkpoint.torch_files import load_torch_file

    for pattern in _ZERO_TO_FP32_GLOBS:
        for found in sorted(glob.glob(os.path.join(str(tdir), pattern))):  # unescaped, as zero_to_fp32 globs
            path = Path(found)
            if path.parent != tdir:  # a glob character in the directory's path matched another directory
                raise CheckpointError(f"{found}: DeepSpeed's zero_to_fp32 would read it from outside {tdir} "
                                      "(rename the directory without glob characters)")
            member(tdir, path.name, str(tdir))
            if path not in read:
                load_torch_file(path, allowed)


def _zero_to_fp32_weights(ckpt_dir: Path, tag: str, allowed: list) -> dict[str, torch.Tensor]:
    """The fp32 master weights, by DeepSpeed's ``zero_to_fp32``, with its failures as one line."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dist8.checkpoint.format import CheckpointError
    from dist8.checkpoint.torch_files import weights_only_loads

    try:
        with weights_only_loads(allowed):  # zero_to_fp32 asks torch.load for weights_only=False
            weights = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except Exception as exc:  # noqa: BLE001 - DeepSpeed's own code, which fails in many ways on a bad checkpoint
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed's zero_to_fp32 cannot read it "
                              f"({type(exc).__name__}: {one_line(exc)[:300]})") from None
    if not isinstance(weights, dict):
        raise CheckpointError(f"{ckpt_dir / tag}: DeepSpeed's zero_to_fp32 returned {type(weights).__name__}")
    return weights


def _counter(value: Any, key: str, model_file: Any) -> int | None:
    """DeepSpeed's ``global_steps``/``global_samples`` as a whole number >= 0 (or None: absent). A tensor, NaN or
    a dict was written into the metadata's ``extra`` after the tensor files (a TypeError, the half-written
    output left behind), a 300 MB string into a metadata no reader accepts (exit 0)."""
    from dist8.checkpoint.format import CheckpointError

    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= 2**62:
        raise CheckpointError(f"{model_file}: {key} must be a whole number in [0, 2**62], got {brief(value)}")
    return int(value)


def _write(out: Path, opt: Optimizer8bit, weights: dict[str, torch.Tensor], entries: dict[str, dict[str, Any]],
           groups_hyper: list[dict[str, Any]], extra: dict[str, Any]) -> str:
    """Write the world-size-1 dist8 checkpoint (loads at any world size); nothing before every check passed."""
    from safetensors.torch import save_file

    from dist8.checkpoint.format import (FORMAT, MODEL_FILE, check_extra, file_entry, install_dir,
                                         metadata_param_groups, rank_file, temp_dir, tensor_key, write_metadata)
    from dist8.checkpoint.model_file import write_model_file
    from dist8.optim.state_schema import GNORM, STEP, absmax_key, is_signed, state_indices, state_key
    from dist8.quant import get_map, num_blocks, quantize_blockwise
    from dist8.version import __version__

    B = opt.block_size
    qmaps = {s: get_map(opt.quant_map, s) for s in (True, False)}
    tensors: dict[str, torch.Tensor] = {}
    pieces = []
    params_meta = []
    block = 0
    for name, weight in weights.items():
        shape = tuple(weight.shape)
        numel = math.prod(shape)
        nb = num_blocks(numel, B)
        params_meta.append({"name": name, "shape": list(shape), "dtype": "float32", "first_block": block,
                            "n_blocks": nb, "group": 0, "block_size": B, "state": {}})
        block += nb
        entry = entries.get(name)
        if entry is None:
            if numel:
                pieces.append([name, 0, numel, 0])  # never stepped: no state
            continue
        for i in state_indices(opt.rule):
            vals = entry[state_key(i)]
            if entry["8bit"]:
                codes, absmax = quantize_blockwise(vals, qmaps[is_signed(opt.rule, i)], B)
                tensors[tensor_key(name, state_key(i))] = codes.contiguous()
                tensors[tensor_key(name, absmax_key(i))] = absmax.contiguous()
            else:
                tensors[tensor_key(name, state_key(i))] = vals.contiguous()
        if GNORM in entry:
            tensors[tensor_key(name, GNORM)] = entry[GNORM].contiguous()
        pieces.append([name, 0, numel, entry[STEP]])
        params_meta[-1]["state"] = {k.split("::")[-1]: str(v.dtype).split(".")[-1] for k, v in tensors.items()
                                    if k.rpartition("::")[0] == name}
    groups_meta = metadata_param_groups(groups_hyper[:1])  # refused before any file is written
    check_extra(extra)
    tmp = temp_dir(out)
    try:  # anything failing from here on leaves no half-written output behind
        fname = rank_file(0, 1)
        save_file(tensors, str(tmp / fname), metadata={"format": FORMAT})
        write_model_file(tmp / MODEL_FILE, weights, {"format": FORMAT})
        files = {f: file_entry(tmp / f) for f in (fname, MODEL_FILE)}
        meta = {
            "dist8_version": __version__,
            "torch_version": torch.__version__, "block_size": B, "world_size": 1,
            "step": max([e[STEP] for e in entries.values()], default=0),
            "optimizer": {"class": type(opt).__name__, "rule": opt.rule.name, "quant_map": opt.quant_map,
                          "block_wise": True, "param_groups": groups_meta},
            "params": params_meta, "pieces": {"0": pieces}, "files": files, "extra": extra,
        }
        write_metadata(tmp, meta)
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
