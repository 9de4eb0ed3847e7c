"""Per-original-parameter optimizer state inside DeepSpeed's flat partitions (ZeRO 1/2/3, bf16 optimizer).

DeepSpeed hands the optimizer one flat fp32 tensor per param group and rank. A dist8 optimizer
class with the :class:`DeepSpeedSegments` mix-in keeps one *segment* of state per (original
parameter, flat partition) range; :func:`attach_segments` reads DeepSpeed's engine to find
those ranges after it has partitioned the parameters. (One concern: the optimizer's view of DeepSpeed's
partitions -- finding the segments, their settings as marks change, their state and its state dict.)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from dist8.integrations.deepspeed_sums import PartitionSums, clips
from dist8.kernels import RULE_WRITES_UPDATE
from dist8.optim import pipeline
from dist8.optim.amp import amp_scaling
from dist8.optim.base import Optimizer8bit, ParamSettings
from dist8.optim.config import GLOBAL_NUMEL_ATTR, OVERRIDE_ATTR, fits_param_names, hyperparameters_of, match_overrides
from dist8.optim.contract import as_scheduler_wrapped
from dist8.optim.settings_watch import SettingsWatch
from dist8.optim.state_schema import (STATE_DICT_INFO, check_state_dict_layout, check_state_dict_map,
                                      check_state_dict_rule, state_key)
from dist8.shard.agreement import failures_on_every_rank

__all__ = ["Segment", "DeepSpeedSegments", "segmented_class", "segment_in_place", "attach_segments", "dp_rank"]


# The way out of a refused state-kind change (check_state_fits): DeepSpeed keeps the state by flat partition.
SEGMENT_STATE_FIX = "make such a change before the first step under DeepSpeed (its state is kept by flat partition)"


@dataclass(frozen=True)
class Segment:
    """Elements ``[offset, offset + numel)`` of a flat partition are elements ``[param_start, ...)`` of parameter
    ``name``; ``source`` is that model parameter, whose ``GlobalOptimManager`` marks are read at every step
    (None: no marks)."""

    name: str
    offset: int
    numel: int
    param_start: int
    shape: tuple[int, ...]
    global_numel: int
    source: torch.Tensor | None = field(default=None, compare=False, hash=False, repr=False)


class DeepSpeedSegments:
    """Mix-in for a dist8 optimizer class: per-original-parameter state inside flat partitions.

    ``self.ds_segments`` maps a flat tensor (as DeepSpeed put it in ``param_groups``) to its
    :class:`Segment` list. Its state is ``{"step": n, "segments": [state per segment],
    "segment_names": [...], "segment_starts": [...], "segment_shapes": [...]}``.
    """

    ds_segments: dict

    def segment_settings(self, seg: Segment, group: dict[str, Any]) -> ParamSettings:
        """Settings of one segment, decided on its whole original parameter (name, marks, size)."""
        extra = match_overrides(seg.name, seg.source, self.overrides)
        hyper = hyperparameters_of(group)
        if extra:
            self.validate_hyper(dict(hyper, **extra), f"overrides for parameter {seg.name}")
        return self.resolve_settings(seg.name, extra, seg.global_numel, hyper)

    @staticmethod
    def segment_view(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
        """The elements of ``seg`` in flat partition ``flat`` (a view, no copy)."""
        return flat.detach().view(-1).narrow(0, seg.offset, seg.numel)

    def follow_marks(self) -> None:
        """Take up ``GlobalOptimManager`` marks and the group values the state depends on changed since the
        last step (:class:`~dist8.optim.settings_watch.SettingsWatch`), as the unsharded optimizer does (an
        ``override_config`` after the first step applies at the next). Collective when something changed,
        which every rank sees alike: a change the existing state cannot follow (8- to 32-bit state,
        percentile clipping without its history) is refused on every rank, naming the parameter, before
        anything is updated; a rank holding no part of that parameter would otherwise go on alone into
        DeepSpeed's all-gather."""
        for lp, hp in getattr(self, "ds_mark_copies", None) or ():  # fp16 unfused: per-parameter fp32 copies
            mark = getattr(lp, OVERRIDE_ATTR, None)
            if getattr(hp, OVERRIDE_ATTR, None) is not mark:
                setattr(hp, OVERRIDE_ATTR, mark)
        seen = getattr(self, "ds_settings_seen", None)
        if seen is None or not seen.watch.changed(seen.params, seen.groups):
            return
        with failures_on_every_rank(seen.dp_group, "dist8 under DeepSpeed", ValueError):
            for flat, segs in self.ds_segments.items():
                group = seen.group_of.get(flat)
                states = (self.state.get(flat) or {}).get("segments") or ()
                for seg, seg_state in zip(segs, states):
                    if seg_state is not None and group is not None:
                        self.check_state_fits(self.segment_view(flat, seg), self.segment_settings(seg, group),
                                              seg_state, fix=SEGMENT_STATE_FIX)
            if seen.unsummed is not None:
                _refuse_whole_parameter_sums(self, self.ds_segments, seen.unsummed)
        seen.watch.accept()
        sums = getattr(self, "ds_sums", None)
        if sums is not None:
            sums.marks_clip = any(clips(m or {}) for m in seen.watch.marks())

    def recheck_settings(self) -> None:
        """The state was replaced (a load): the next step checks it against the settings on every rank
        (:meth:`follow_marks`), as after a change of the settings."""
        seen = getattr(self, "ds_settings_seen", None)
        if seen is not None:
            seen.watch.forget()

    @torch.no_grad()
    def step(self, closure=None):
        self.follow_marks()
        segs_of = getattr(self, "ds_segments", None) or {}
        if not segs_of:
            # The class's step is torch's hook-running wrapper, and so is the dist8 class's below:
            # call the latter unwrapped, or step hooks would run twice.
            parent = super().step
            return getattr(parent, "__wrapped__", parent.__func__)(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:  # a bad value written into a group (lr = nan): named before any update
            self.check_changed_group(group, hyperparameters_of(group))
        items = []
        owners = []
        sums = getattr(self, "ds_sums", None)
        sums = sums if sums is not None and sums.active(self) else None
        slot_of: dict[torch.Tensor, int] = {}  # item tensor -> its parameter's slot in the summed partials
        # (DeepSpeed steps one param group, ZeRO-1/2, or one sub-group's partition, ZeRO-3, per call, so
        # private slots are keyed by the partition itself, not by its place in param_groups)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                segs = segs_of.get(p)
                if segs is None:  # a flat partition holding only padding
                    settings = self.settings(p, group)
                    if not self.state[p]:
                        self.state[p] = self.init_state(p, settings)
                    items.append(pipeline.UpdateItem(p, settings, self.state[p]))
                    if sums is not None:
                        slot_of[p] = sums.slot("", ("padding", id(p)))
                    continue
                st = self.state[p]
                if not st:
                    st.update(step=0, segments=[None] * len(segs), segment_names=[s.name for s in segs],
                              segment_starts=[s.param_start for s in segs],
                              segment_shapes=[list(s.shape) for s in segs])
                grad = p.grad.detach().view(-1)
                for i, seg in enumerate(segs):
                    view = self.segment_view(p, seg)
                    view.grad = grad.narrow(0, seg.offset, seg.numel)
                    settings = self.segment_settings(seg, group)
                    if st["segments"][i] is None:
                        st["segments"][i] = self.init_state(view, settings)
                    items.append(pipeline.UpdateItem(view, settings, st["segments"][i]))
                    if sums is not None:
                        slot_of[view] = sums.slot(seg.name, (seg.name, id(p)))
                owners.append(st)
        # DeepSpeed's torch_autocast with fp16 steps through torch.amp.GradScaler, which left the
        # gradients scaled and set this optimizer's grad_scale/found_inf (dist8.optim.amp)
        amp = amp_scaling(self)
        if sums is not None:
            # Sums over whole parameters (trust ratios, clipping norms, skip_param/raise flags) add every
            # rank's part: every rank runs the pipeline, with or without items of its own.
            self.global_slots, self.global_slot_names = (slot_of, sums.n_slots), sums.slot_names
            self.reduce_partials = sums.all_reduce
            try:
                pipeline.run_updates(self, items, amp)
            finally:
                self.global_slots = self.global_slot_names = self.reduce_partials = None
        elif items:
            pipeline.run_updates(self, items, amp)
        for st in owners:
            st["step"] = max([s["step"] for s in st["segments"] if s is not None], default=st["step"])
        return loss

    def state_nbytes(self) -> int:
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
            for seg in st.get("segments", None) or []:
                if seg:
                    total += sum(v.numel() * v.element_size() for v in seg.values() if isinstance(v, torch.Tensor))
        return total

    def state_dtypes(self) -> dict[str, torch.dtype]:
        """``{parameter name (or flat position): dtype of state1}`` over all state (for tests and reports)."""
        out = {}
        for p, st in self.state.items():
            if "segments" in st:
                for name, seg in zip(st["segment_names"], st["segments"]):
                    if seg:
                        out[name] = seg[state_key(1)].dtype
            elif state_key(1) in st:
                out[self.param_name(p)] = st[state_key(1)].dtype
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        names = {}
        pid = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.param_names:
                    names[pid] = self.param_names[p]
                pid += 1
        sd[STATE_DICT_INFO] = {**sd.get(STATE_DICT_INFO, {}),  # quant_map: the codes' map
                               "class": type(self).__name__, "block_size": self.block_size, "names": names,
                               "rule": self.rule.name}  # per instance for RMSprop (momentum buffer or not)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        segs_of = getattr(self, "ds_segments", None) or {}
        if not segs_of:
            return super().load_state_dict(state_dict)
        # Segments hold raw 8-bit codes: read with another map or block size they would be other numbers.
        check_state_dict_layout(state_dict)
        check_state_dict_map(state_dict, self.quant_map)
        check_state_dict_rule(state_dict, self.rule)
        plain = {"state": {}, "param_groups": state_dict["param_groups"]}
        seg_states = {}
        for key, st in state_dict["state"].items():
            (seg_states if "segments" in st else plain["state"])[key] = st
        saved_block = (state_dict.get(STATE_DICT_INFO) or {}).get("block_size", self.block_size)
        if seg_states and saved_block != self.block_size:
            raise ValueError(f"DeepSpeed optimizer state was saved with block_size={saved_block!r}, this engine's "
                             f"optimizer uses block_size={self.block_size!r}: construct it with "
                             f"block_size={saved_block!r}")
        super().load_state_dict(plain)
        id_map = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            id_map.update(zip(saved["params"], group["params"]))
        for key, st in seg_states.items():
            p = id_map[key]
            segs = segs_of.get(p)
            if segs is None or [s.name for s in segs] != list(st["segment_names"]):
                raise ValueError(f"DeepSpeed optimizer state for flat partition {key} holds parameters "
                                 f"{list(st['segment_names'])[:4]}..., which do not match this engine's partition "
                                 "(different world size or model? use `dist8 ckpt from-deepspeed` to reshard)")
            new = dict(st)
            new["segments"] = [None if s is None else self.check_state(self.segment_view(p, seg), s)
                               for seg, s in zip(segs, st["segments"])]
            self.state[p] = new
        self.recheck_settings()


_CLASSES: dict[type, type] = {}


def segmented_class(cls: type[Optimizer8bit]) -> type[Optimizer8bit]:
    """``cls`` with the :class:`DeepSpeedSegments` mix-in (same ``__name__``, so checkpoints name ``cls``)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (DeepSpeedSegments, cls), {"__module__": "dist8.integrations.deepspeed",
                                                                      "__doc__": cls.__doc__})
    return _CLASSES[cls]


def segment_in_place(opt: Optimizer8bit) -> Optimizer8bit:
    """Make ``opt`` itself an instance of ``segmented_class(type(opt))`` (no-op if it is one); returns ``opt``.

    For a dist8 optimizer handed to DeepSpeed as an instance (``deepspeed.initialize(optimizer=opt)``,
    as HF Trainer, accelerate and Lightning do): DeepSpeed partitions and steps that very object, and an
    LR scheduler made on it before keeps driving it. Its settings, names, state and hooks stay; torch's
    hook-running ``step`` is put on the new class through the optimizer's own ``__getstate__``/
    ``__setstate__`` (as at construction), and a scheduler's wrapper of the old class's ``step`` is made
    again for the new one (:func:`~dist8.optim.contract.as_scheduler_wrapped`).
    """
    if isinstance(opt, DeepSpeedSegments):
        return opt
    cls = segmented_class(type(opt))
    scheduled = getattr(opt.__dict__.get("step"), "_wrapped_by_lr_sched", False)
    opt.__class__ = cls
    opt.__setstate__(opt.__getstate__())
    if scheduled:
        opt.step = as_scheduler_wrapped(opt, cls.step)
    return opt


def dp_rank(group) -> int:
    """This process's rank in ``group`` (0 without torch.distributed)."""
    import torch.distributed as dist

    return dist.get_rank(group=group) if dist.is_available() and dist.is_initialized() else 0


def attach_segments(engine) -> dict:
    """Tell ``engine.basic_optimizer`` (a dist8 optimizer) what each flat partition holds."""
    opt = engine.basic_optimizer
    wrapper = engine.optimizer
    module = engine.module
    names = {p: n for n, p in module.named_parameters()}
    segs: dict[torch.Tensor, list[Segment]] = {}
    group_of: dict[torch.Tensor, dict] = {}  # flat partition -> its param group (DeepSpeed shows one per step call)
    opt_params = [p for g in opt.param_groups for p in g["params"]]
    if any(p in names for p in opt_params) and not hasattr(wrapper, "fp32_partitioned_groups_flat"):
        opt.ds_segments = {}
        return {}  # the optimizer holds the model's own parameters (no ZeRO, fp32)
    if hasattr(wrapper, "fp32_partitioned_groups_flat") and hasattr(wrapper, "fp16_groups"):  # ZeRO-3
        rank = dp_rank(getattr(wrapper, "dp_process_group", None))
        for i, params in enumerate(wrapper.fp16_groups):
            flat = wrapper.fp32_partitioned_groups_flat[i]
            off = 0
            lst = []
            for p in params:
                pn = p.ds_tensor.ds_numel
                start = rank * pn
                real = max(0, min(pn, p.ds_numel - start))
                if real:
                    lst.append(Segment(names.get(p, f"param{id(p)}"), off, real, start, tuple(p.ds_shape), p.ds_numel,
                                       p))
                off += pn
            segs[flat] = lst
            group_id = (getattr(wrapper, "sub_group_to_group_id", None) or {}).get(i)
            if group_id is not None:
                group_of[flat] = opt.param_groups[group_id]
    else:
        for n, p in module.named_parameters():
            m = getattr(p, "_hp_mapping", None)
            if m is None:
                continue
            flat = opt.param_groups[m.param_group_index]["params"][0]
            group_of[flat] = opt.param_groups[m.param_group_index]
            segs.setdefault(flat, []).append(Segment(n, m.hp_fragment_address.start, m.hp_fragment_address.numel,
                                                     m.lp_fragment_address.start, tuple(p.shape), p.numel(), p))
        for lst in segs.values():
            lst.sort(key=lambda s: s.offset)
        # fp16 unfused optimizer: per-parameter fp32 copies; name them.
        if not segs and hasattr(wrapper, "fp32_groups") and hasattr(wrapper, "fp16_groups"):
            opt.ds_mark_copies = []  # the marks follow the model's parameters' at every step (follow_marks)
            for lp_group, hp_group in zip(wrapper.fp16_groups, wrapper.fp32_groups):
                for lp, hp in zip(lp_group, hp_group):
                    if lp in names:
                        opt.param_names[hp] = names[lp]
                        opt.ds_mark_copies.append((lp, hp))
                        if getattr(lp, OVERRIDE_ATTR, None):
                            setattr(hp, OVERRIDE_ATTR, getattr(lp, OVERRIDE_ATTR))
    for g in opt.param_groups:  # DeepSpeed replaced the named parameters with its flat partitions
        if "param_names" in g and not fits_param_names(g["param_names"], len(g["params"])):
            del g["param_names"]
    for g in opt.param_groups:  # anything left unmapped: decide on the model's size, not the shard's
        for p in g["params"]:
            if p not in segs and p not in names and p not in opt.param_names:
                total = sum(q.numel() if not hasattr(q, "ds_numel") else q.ds_numel for q in names)
                setattr(p, GLOBAL_NUMEL_ATTR, total)
    opt.ds_segments = segs
    group = getattr(wrapper, "dp_process_group", None)
    model_names = [n for n, _ in module.named_parameters()]
    named = set(model_names)
    # MoE: expert groups are partitioned over other process groups than the data-parallel one
    experts = _has_expert_groups(wrapper, group)

    def unsummed(seg: Segment) -> bool:
        return experts or seg.name not in named

    params = list(module.parameters())
    groups = list({id(g): g for g in group_of.values()}.values())
    opt.ds_settings_seen = _SettingsSeen(params, groups, group_of, group, unsummed)
    opt.ds_settings_seen.watch.changed(params, groups)
    opt.ds_settings_seen.watch.accept()  # the settings the refusal below and the sums are decided on
    # every rank, so that all refuse together (a rank holding no split parameter would go on alone)
    with failures_on_every_rank(group, "dist8 under DeepSpeed", ValueError):
        _refuse_whole_parameter_sums(opt, segs, unsummed)
    opt.ds_sums = None
    if not experts:
        # what no name stands for on every rank (see PartitionSums), keyed by the partition: ZeRO-1/2 partitions
        # holding only padding (param_groups hold every group now, one per step() call later), and segments of
        # parameters the model does not name (ZeRO-3, whose param_groups are empty now)
        private = [("padding", id(p)) for g in opt.param_groups for p in g["params"] if p not in segs]
        private += [(seg.name, id(flat)) for flat, lst in segs.items() for seg in lst if seg.name not in named]
        split_here = any(seg.numel != seg.global_numel for lst in segs.values() for seg in lst)
        marks_clip = any(clips(m or {}) for m in opt.ds_settings_seen.watch.marks())
        opt.ds_sums = PartitionSums.agreed(model_names, private, group, torch.device(engine.device), marks_clip,
                                           split_here)
    return segs


@dataclass
class _SettingsSeen:
    """What a DeepSpeed-partitioned optimizer's settings are decided from (follow_marks): the model's
    parameters (their marks), the param groups, each flat partition's group, the data-parallel group,
    which split parameters dist8 does not sum over, and the watch on their marks and values."""

    params: list
    groups: list
    group_of: dict
    dp_group: Any
    unsummed: Callable[[Segment], bool] | None
    watch: SettingsWatch = field(default_factory=SettingsWatch)


def _has_expert_groups(wrapper, group) -> bool:
    """Whether DeepSpeed partitions some param group over another process group than ``group`` (MoE
    expert parameters: ``real_dp_process_group``)."""
    return any(g is not group for g in getattr(wrapper, "real_dp_process_group", None) or [])


def _refuse_whole_parameter_sums(opt: Optimizer8bit, segs: dict[torch.Tensor, list[Segment]],
                                 unsummed: Callable[[Segment], bool]) -> None:
    """Refuse what needs sums over a whole parameter when DeepSpeed split one across ranks' partitions
    and ``unsummed(segment)`` says dist8 does not sum over that parameter's parts: a model with expert
    (MoE) groups, partitioned over other process groups, or a parameter the model does not name.

    LAMB/LARS trust ratios, percentile clipping's gradient norm and ``on_nonfinite="skip_param"``/
    ``"raise"`` decide per parameter from sums over all its elements; a rank summing only its own part
    of a split parameter would step it wrongly, silently (a 64x64 weight split in two took 0.14x and
    1.4x the unsharded LAMB update). Parameters kept whole on one rank are exact.
    """
    # the flat partition's param group, as attach_segments found it (else by storage; any group then)
    known = getattr(opt, "ds_settings_seen", None)
    group_of = {p.data_ptr(): g for g in opt.param_groups for p in g["params"]}
    for flat, lst in segs.items():
        for seg in lst:
            if seg.numel == seg.global_numel or not unsummed(seg):
                continue
            if known is not None and flat in known.group_of:
                groups = [known.group_of[flat]]
            else:
                groups = [group_of[flat.data_ptr()]] if flat.data_ptr() in group_of else opt.param_groups
            clip = min(opt.segment_settings(seg, g).hyper["percentile_clipping"] for g in groups)
            needs = ([f"{type(opt).__name__}'s trust ratio"] if opt.rule in RULE_WRITES_UPDATE else []) + (
                [f"percentile_clipping={clip}"] if clip < 100 else []) + (
                [f"on_nonfinite={opt.on_nonfinite!r}"] if opt.on_nonfinite in ("skip_param", "raise") else [])
            if needs:
                raise ValueError(
                    f"parameter {seg.name} is split across DeepSpeed's ZeRO partitions of a model with expert (MoE) "
                    f"groups or outside the model's named parameters, and dist8 does not sum over such a parameter "
                    f"across ranks, which {' and '.join(needs)} {'needs' if len(needs) == 1 else 'need'} (each rank "
                    "would decide from its own part, silently): drop that setting, or use ShardedOptimizer or FSDP2")
