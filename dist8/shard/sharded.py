"""ShardedOptimizer: ZeRO-1/2 with optimizer state partitioned at quantization-block granularity.

One concern, one class: the ZeRO-1/2 optimizer (flat parameter buffers, step,
all-gather, state dict, and keeping the parameters its buffers' views over their lifetime: taken over
from an earlier optimizer, taken back after a client copied them, refused when frozen at
construction or added later). Stage-2 gradients (buffer, hooks, buckets) live in ``grads.py``, the flat
buffers in ``flat.py``, the block layout in ``layout.py``, the collectives that move quantized state
in ``collectives.py``, the state-dict formats in ``state_dicts.py``, the checks made while it is built in
``construction.py``, the fp32 master copies of 16-bit parameters in ``masters.py``.
"""
from __future__ import annotations

import contextlib
import numbers
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dist8.kernels.eager import eager_only
from dist8.optim import AdamW8bit
from dist8.optim.amp import check_amp_unscale
from dist8.optim.base import Optimizer8bit
from dist8.optim.comparable import comparable
from dist8.optim.config import (GLOBAL_NUMEL_ATTR, OVERRIDE_ATTR, PARAM_LIST_KEYS, PIECE_START_ATTR, check_overrides,
                                check_overrides_match, hyperparameters_of, split_named_params)
from dist8.optim.dcp_init import called_by_dcp, called_by_dcp_init
from dist8.optim.dtensor_layout import is_dtensor
from dist8.optim.hooks import load_state_dict_with_hooks, state_dict_with_hooks
from dist8.optim.lazy_dynamo import LazyDynamoOptimizer
from dist8.optim.manager import apply_positional_configs, restore_module_marks
from dist8.optim.master_weights import check_half_params
from dist8.optim.settings_watch import SettingsWatch
from dist8.optim.state_schema import CORRECTION
from dist8.optim.validation import check_gradient, check_number
from dist8.shard import state_dicts
from dist8.shard.agreement import agree_every_step, failures_on_every_rank
from dist8.shard.construction import (check_no_master_weight_override, check_optimizer_class,
                                     check_same_layout_on_all_ranks, check_tensors, master_weight_bits_of,
                                     optimizer_settings)
from dist8.shard.flat import flat_buffers
from dist8.shard.grads import Stage2Grads
from dist8.shard.layout import BlockLayout, Piece
from dist8.shard.masters import MasterCopies
from dist8.shard.replicated_grads import first_difference, gradient_fingerprints
from dist8.quant import DEFAULT_BLOCK_SIZE

__all__ = ["ShardedOptimizer"]

# The way out of a refused state-kind change (check_state_fits): the state is kept by piece, not by parameter.
SHARDED_STATE_FIX = ("make such a change before the first step, or take it back (ShardedOptimizer keeps the state "
                     "by piece; a new one starts afresh)")

# The ShardedOptimizer each parameter is laid out in, by id() (no weak reference to a parameter:
# torch.utils.swap_tensors refuses those); an entry is checked against the optimizer's own list.
_LAID_OUT_IN: weakref.WeakValueDictionary[int, ShardedOptimizer] = weakref.WeakValueDictionary()


def _numbers_as_floats(value: Any) -> Any:
    """A :func:`comparable` value with its integers as floats: ``0`` and ``0.0`` are one setting (a group
    written one way on one rank and the other way on another is not a difference)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, tuple):
        return tuple(_numbers_as_floats(v) for v in value)
    if isinstance(value, dict):
        return {k: _numbers_as_floats(v) for k, v in value.items()}
    return value


class ShardedOptimizer(LazyDynamoOptimizer):
    """Wraps a dist8 optimizer so each rank keeps the state of a contiguous range of whole blocks.

    Args:
        params: parameters, ``model.named_parameters()`` (names enable overrides and
            name-keyed checkpoints) or param-group dicts; identical on every rank.
        optimizer_class: a :class:`dist8.optim.Optimizer8bit` subclass (default
            :class:`dist8.optim.AdamW8bit`).
        stage: 2 (default): gradients are summed onto their owning rank by hooks
            during backward, no DDP wrapper needed (so each rank's ``.grad`` holds partial
            sums after backward: clip with :meth:`clip_grad_norm`; a gradient changed in place
            after backward, e.g. by ``torch.nn.utils.clip_grad_norm_``, is refused at the step);
            1: gradients are already averaged (e.g. by DDP) and only the state is sharded (the first
            step with gradients checks that they are equal on every rank, refusing them naming a
            parameter if not: a model without DDP).
        process_group: the group the state is sharded over (default: the world); stage 2 sums the
            gradients over it, so it must then be the whole data-parallel group. A smaller group with
            stage 1 under DDP over every rank shards within it and replicates across groups (ZeRO-1
            within a node), bitwise the plain optimizer under DDP; :func:`dist8.checkpoint.save` writes
            one checkpoint for such replicas and refuses groups holding other values in one directory.
            Without an initialised ``torch.distributed`` the optimizer runs as a single rank.
        bucket_cap_mb: size of gradient-reduction and parameter-gather buckets (MiB).
        full_state_dict: False (default): :meth:`state_dict` is this rank's shard (loads on the
            same rank of the same world size; :mod:`dist8.checkpoint` reshards). True: it is the
            whole state in the unsharded optimizer's format, the same on every rank (a collective;
            every rank holds the full quantized state, 2.03 bytes per parameter, while it exists) --
            for clients that save rank 0's ``optimizer.state_dict()`` and load that file on every
            rank (PyTorch Lightning's DDP; HF Trainer's with
            :class:`dist8.integrations.hf_trainer.ShardedStateDictCallback`, since it calls
            ``state_dict()`` on rank 0 only). :meth:`load_state_dict` takes either format in both
            modes, the full one at any world size.
        **defaults: arguments of ``optimizer_class`` (``lr``, ``betas``, ``block_size``, ...).

    Parameters become views into one flat buffer per dtype (so the all-gather after
    each step writes them in place), holding the first rank's values on every rank (broadcast
    at construction, as DDP does); a model with several dtypes (``dist8.cast_model``
    keeps norm layers fp32 next to bf16 weights) is partitioned exactly as a single-dtype
    one, since the block layout and rank ranges depend on names and shapes only.
    bf16/fp16 parameters get an fp32 master copy of
    the owned range on the owning rank only (4 bytes per owned value), or, with
    ``master_weight_bits=24|32``, the inner optimizer's int8/int16 correction of
    the owned range (1 or 2 bytes per owned value; laid out and partitioned like
    the other state, saved and re-sliced by :mod:`dist8.checkpoint`); the step is
    then bitwise the unsharded optimizer's with the same option.

    ``steps_taken`` counts the steps on every rank alike (a shard state dict records it and a load of
    one restores it), so that a load can tell shard files of different saves apart.
    """

    def __init__(
        self,
        params: Iterable,
        optimizer_class: type[Optimizer8bit] = AdamW8bit,
        *,
        stage: int = 2,
        process_group: dist.ProcessGroup | None = None,
        bucket_cap_mb: float = 25,
        full_state_dict: bool = False,
        **defaults: Any,
    ) -> None:
        if isinstance(stage, bool) or not isinstance(stage, numbers.Integral) or stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        check_optimizer_class(optimizer_class)
        # nan/inf failed later in int(), a string in a comparison, True passed as 1 MiB
        bucket_cap_mb = check_number(bucket_cap_mb, "bucket_cap_mb", "ShardedOptimizer", lo=0, lo_open=True)
        initialised = dist.is_available() and dist.is_initialized()
        if process_group is not None and not initialised:
            raise RuntimeError("process_group was given but torch.distributed is not initialised; "
                               "call torch.distributed.init_process_group first")
        self.group = process_group
        self.world_size = dist.get_world_size(process_group) if initialised else 1
        self.rank = dist.get_rank(process_group) if initialised else 0
        amp_unscale = check_amp_unscale(defaults.get("amp_unscale", "kernel"))
        if amp_unscale == "scaler" and stage == 2 and self.world_size > 1:
            raise ValueError(
                "amp_unscale='scaler' is not supported by ShardedOptimizer(stage=2) on several ranks: the scaler "
                "would read the gradients while they are still being reduced. Use stage=1 under DDP, or the "
                "default amp_unscale='kernel'"
            )
        self.stage = stage
        self._stage1_grads_checked = False  # stage 1: gradients compared across ranks once (replicated_grads)
        self.optimizer_class = optimizer_class
        if not isinstance(full_state_dict, bool):
            raise ValueError(f"full_state_dict must be True or False, got {full_state_dict!r}")
        self.full_state_dict = full_state_dict
        self._gathered_state: dict[int, dict[str, Any]] | None = None  # prepare_full_state_dict's, until a step
        self.steps_taken = 0
        self._settings_watch = SettingsWatch()  # what _check_settings_change last passed

        groups, names = split_named_params(params)
        apply_positional_configs(groups)  # GlobalOptimManager.register_parameters' overrides, by the user's positions
        self.params: list[torch.Tensor] = []  # the parameters in layout order (views of their flat buffer)
        self.names: list[str] = []  # their names, same order
        self._group_of: list[int] = []
        # parameters frozen now are left out of the layout (no flat buffer, gradient buffer or state);
        # one that gets a gradient later is refused at the step (_refuse_gradients_outside_the_layout)
        self._outside_layout: list[tuple[torch.Tensor, str]] = []
        for gi, group in enumerate(groups):
            for i, p in enumerate(group["params"]):
                if p.requires_grad:
                    self.params.append(p)
                    self.names.append(names.get(p, f"param{len(self.params) - 1}"))
                    self._group_of.append(gi)
                else:
                    self._outside_layout.append((p, names.get(p, f"group {gi} index {i}")))
        if not self.params:
            raise ValueError("ShardedOptimizer got no parameters that require grad")
        # What this rank's own tensors forbid is raised at the layout agreement below, on every rank: one
        # rank refusing alone (ranks > 0 often build the model on the meta device and leave the weights to
        # rank 0) left the others waiting in that collective forever.
        local_problem: Exception | None = None
        try:
            check_tensors(self.params, self.names)
        except (TypeError, ValueError) as exc:
            local_problem = exc
        overrides = check_overrides(defaults.get("overrides"))
        check_overrides_match(overrides, names.values())
        if defaults.get("block_wise", True) is False:
            raise ValueError("ShardedOptimizer needs block_wise=True: its layout shards whole blocks of one block_size")
        block_size = defaults.get("block_size", DEFAULT_BLOCK_SIZE)
        self.layout = BlockLayout(self.names, [p.shape for p in self.params], block_size)
        settings = optimizer_settings(optimizer_class, groups, defaults, self.params,
                                      dict(stage=stage, bucket_cap_mb=bucket_cap_mb, full_state_dict=full_state_dict))
        check_same_layout_on_all_ranks(self.layout, self.params, self.names, self.group, self.world_size,
                                       local_problem, settings)

        self.device = self.params[0].device
        B = block_size
        # One flat buffer per parameter dtype (dist8.shard.flat); parameters become views of theirs.
        self.buffers = flat_buffers(self.layout, [p.dtype for p in self.params], self.device, self.world_size)
        self._buffer_of: list[int] = [0] * len(self.params)
        for k, buf in enumerate(self.buffers):
            for i in buf.members:
                self._buffer_of[i] = k
                p = self.params[i]
                view = buf.view(i, 0, p.numel())
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)
        if self.world_size > 1:
            self._broadcast_parameters()
        # bf16/fp16 parameters: an fp32 master copy of the owned range of their buffer, unless
        # master_weight_bits keeps an int8/int16 correction per owned value instead (inner optimizer
        # state, partitioned like the rest). Index k: the master of buffer k, or None.
        self.master_weight_bits = master_weight_bits_of(groups, defaults)
        check_no_master_weight_override(self.params, self.names, overrides, self.master_weight_bits)
        # here, on every rank alike: a rank's inner optimizer sees only its pieces (none on a rank owning no block)
        check_half_params(self.master_weight_bits, [p.dtype for p in self.params])
        self.masters = MasterCopies(self.buffers, self.rank, self.master_weight_bits)
        self.pieces = self.layout.pieces(self.rank, self.world_size)

        # Inner optimizer over this rank's pieces (views of the flat buffers or of the fp32 masters).
        self._piece_views: list[torch.Tensor] = []
        inner_groups = [dict(hyperparameters_of(g), params=[]) for g in groups]
        slot_of: dict[torch.Tensor, int] = {}
        for piece in self.pieces:
            view = self._owned(piece)
            p = self.params[piece.param]
            setattr(view, GLOBAL_NUMEL_ATTR, p.numel())
            setattr(view, PIECE_START_ATTR, piece.start)
            if hasattr(p, OVERRIDE_ATTR):
                setattr(view, OVERRIDE_ATTR, getattr(p, OVERRIDE_ATTR))
            inner_groups[self._group_of[piece.param]]["params"].append((self.names[piece.param], view))
            self._piece_views.append(view)
            slot_of[view] = piece.param
        self.inner = optimizer_class(inner_groups, **defaults)
        self.inner.warn_without_gradients = False  # a rank's pieces may all lack gradients (an unused branch)
        self.inner.global_slots = (slot_of, len(self.params))
        self.inner.global_slot_names = list(self.names)
        if self.world_size > 1:
            self.inner.reduce_partials = self._all_reduce_sum

        self._accumulating = False
        self.gather_chunks = [max(B, int(bucket_cap_mb * 2**20 / buf.flat.element_size()) // B * B)
                              for buf in self.buffers]
        self.bytes_gathered = 0
        # stage 2: the flat gradient buffers, the parameters' .grad views of them and the reduction hooks
        self.stage2_grads: Stage2Grads | None = None
        if stage == 2:
            size0 = self.buffers[0].flat.element_size()
            cap_bytes = max(B, int(bucket_cap_mb * 2**20 / size0) // B * B) * size0
            self.stage2_grads = Stage2Grads(self.params, self.names, self.buffers, self._buffer_of, self.rank,
                                            self.world_size, self.group, cap_bytes, lambda: self._accumulating)
        super().__init__(groups, dict(self.inner.defaults))
        self._laid_out = True  # from now on add_param_group is refused
        self._group_members = [{id(p): p for p in g["params"]} for g in self.param_groups]  # see _refuse_edited_groups
        self._sync_hyper(to_inner=False)
        self._superseded_by: str | None = None
        self._take_over_parameters()
        # where each parameter's values live (its view of a flat buffer), to notice a replaced storage
        self._storage = [p.data_ptr() for p in self.params]

    def _broadcast_parameters(self) -> None:
        """The group's first rank's parameter values to every rank (collective), before any master copy
        is taken, as DDP and DeepSpeed do at construction. Each rank's blocks start from that rank's
        values, so weights loaded on rank 0 only (DDP's habit), or a different random init per rank,
        left the model a patchwork of the ranks' values after the first step, silently."""
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        for buf in self.buffers:
            dist.broadcast(buf.flat, src=src, group=self.group)

    def _take_over_parameters(self) -> None:
        """An earlier ShardedOptimizer over any of these parameters (rebuilt after unfreezing, a second
        ``train()``, a notebook cell run again) gives them up: its stage-2 hooks would otherwise go on
        reducing into its own buffers (and refuse the second backward), and its step would write
        buffers the parameters no longer view. Stepping it is refused from now on."""
        for p, name in zip(self.params, self.names):
            earlier = _LAID_OUT_IN.get(id(p))
            if earlier is not None and earlier is not self and any(q is p for q in earlier.params):
                earlier._give_up(name)
            _LAID_OUT_IN[id(p)] = self

    def _give_up(self, name: str) -> None:
        """Stop serving the parameters (a newer ShardedOptimizer over parameter ``name`` took them):
        backward hooks removed, :meth:`step` refused."""
        if self._superseded_by is None:
            self._superseded_by = name
            if self.stage2_grads is not None:
                self.stage2_grads.remove()

    # ---- views -------------------------------------------------------------------
    def _flat(self, index: int, start: int, numel: int) -> torch.Tensor:
        """Elements ``[start, start + numel)`` of parameter ``index`` in its flat buffer."""
        return self.buffers[self._buffer_of[index]].view(index, start, numel)

    def _owned(self, piece: Piece) -> torch.Tensor:
        """View of an owned piece: into its buffer's fp32 master (low-precision params) or the buffer."""
        k = self._buffer_of[piece.param]
        buf, master = self.buffers[k], self.masters[k]
        off = buf.offset[piece.param] + piece.start
        if master is not None:
            off -= buf.rank_ranges[self.rank][0]
            return master[off : off + piece.numel]
        return buf.flat[off : off + piece.numel]

    def master_piece(self, piece: Piece) -> torch.Tensor | None:
        """The fp32 master copy of an owned piece (a view), or None where its parameter's dtype has none
        (fp32 parameters, or 16-bit ones whose master is ``master_weight_bits``' correction)."""
        return self._owned(piece) if self.masters[self._buffer_of[piece.param]] is not None else None

    def refresh_masters(self) -> None:
        """Set the fp32 master copies from the (16-bit) parameters they shadow."""
        self.masters.refresh()

    def masters_snapshot(self) -> list[torch.Tensor | None]:
        """Copies of the fp32 master copies (for :meth:`restore_masters`)."""
        return self.masters.snapshot()

    def restore_masters(self, snapshot: list[torch.Tensor | None]) -> None:
        """Put back a :meth:`masters_snapshot`."""
        self.masters.restore(snapshot)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once built (ValueError, nothing added): the block layout, flat buffers, gradient
        hooks and rank ranges are fixed when the optimizer is built (torch calls this while building)."""
        if not getattr(self, "_laid_out", False):
            super().add_param_group(param_group)
            return
        params = param_group.get("params") if isinstance(param_group, dict) else None
        params = [params] if isinstance(params, torch.Tensor) else list(params or [])
        first = f" (parameter {self._name_of(params[0])}{', ...' if len(params) > 1 else ''})" if params else ""
        raise ValueError(f"ShardedOptimizer cannot add param group {len(self.param_groups)}{first}: its block layout "
                         "is fixed when it is built, from the parameters that require grad then; build a new one "
                         "with every group that will train (it takes the parameters over); nothing was added")

    def _name_of(self, p: Any) -> str:
        for q, name in zip(self.params, self.names):
            if q is p:
                return name
        for q, name in self._outside_layout:
            if q is p:
                return name
        return f"of shape {tuple(p.shape)}" if isinstance(p, torch.Tensor) else repr(p)[:40]

    @torch.no_grad()
    def adopt_parameters(self) -> None:
        """Take parameters whose storage was replaced since the optimizer was built back into its flat
        buffers; called by :meth:`step`, :meth:`clip_grad_norm`, :meth:`check_shard_state` (so by
        :meth:`load_shard_state`, :meth:`load_state_dict` and :func:`dist8.checkpoint.load`),
        :meth:`load_fp32_master` and :func:`dist8.checkpoint.save` before they read or write a parameter.

        Parameters are views of the flat buffers: the step updates and all-gathers the buffers. A
        tensor put in a parameter's place would never be trained (stage 2: silently). One with the same
        dtype and device is taken back with its values: accelerate's ``prepare`` (so HF Trainer's) does
        ``model.to("cpu:0")``, which copies every CPU tensor, and weights a client then loads go into
        those copies (accelerate's ``load_state`` in a new process). Where the values differ, the
        parameter's fp32 master copy (or ``master_weight_bits`` correction) restarts from them, as for
        weights loaded into a 16-bit model. Another dtype or device (``model.to(dtype)``, ``.cuda()``,
        ``.half()`` after building) is refused naming the parameter; the same code runs on every rank,
        so every rank refuses.
        """
        for i, (p, name, ptr, k) in enumerate(zip(self.params, self.names, self._storage, self._buffer_of)):
            if p.data_ptr() == ptr:
                continue
            view = self.buffers[k].view(i, 0, p.numel())
            if not (p.dtype == view.dtype and p.device.type == view.device.type
                    and (p.device.index or 0) == (view.device.index or 0)):
                now = f"{str(p.dtype).replace('torch.', '')} on {p.device}"
                was = f"{str(view.dtype).replace('torch.', '')} on {view.device}"
                raise RuntimeError(f"parameter {name} no longer lives in the ShardedOptimizer's flat buffer ({now}, "
                                   f"was {was}): the model was moved or cast after the optimizer was built "
                                   "(model.to(...), .cuda(), .half()); do that first, then build the "
                                   "ShardedOptimizer (nothing was updated)")
            changed = not torch.equal(p.detach().reshape(-1), view)
            if changed:
                view.copy_(p.detach().reshape(-1))
            p.data = view.view(p.shape)
            self._storage[i] = p.data_ptr()
            if changed:
                self._restart_masters(i)
        self.masters.follow_writes(self.params)

    def _restart_masters(self, index: int) -> None:
        """Parameter ``index`` took new values: its owned pieces' fp32 master copies become them and
        their ``master_weight_bits`` corrections 0 (the 16-bit values are then the masters)."""
        for piece, view in zip(self.pieces, self._piece_views):
            if piece.param != index:
                continue
            master = self.master_piece(piece)
            if master is not None:
                master.copy_(self._flat(index, piece.start, piece.numel))
            correction = (self.inner.state.get(view) or {}).get(CORRECTION)
            if correction is not None:
                correction.zero_()

    def _refuse_edited_groups(self) -> None:
        """The parameters of each group are fixed with the layout. One removed from ``param_groups`` by
        hand (to stop training it, as torch's optimizers then do) was still trained, silently, and one
        put in was never trained: refused naming it, nothing updated (the same edit on every rank
        refuses on every rank). Reordering a group's parameters changes nothing and is allowed."""
        if len(self.param_groups) != len(self._group_members):
            raise ValueError(f"ShardedOptimizer was built with {len(self._group_members)} param groups and now has "
                             f"{len(self.param_groups)}: its block layout is fixed when it is built; build a new one "
                             "(nothing was updated)")
        for gi, (group, members) in enumerate(zip(self.param_groups, self._group_members)):
            now = {id(p): p for p in group["params"]}
            if now.keys() == members.keys():
                continue
            removed = [p for i, p in members.items() if i not in now]
            if any(is_dtensor(p) for i, p in now.items() if i not in members):  # accelerate's/HF's FSDP2 prepare
                instead_of = f" in place of {self._name_of(removed[0])}" if removed else ""
                raise TypeError(f"param group {gi} now holds FSDP2's DTensor parameters{instead_of}: the model was "
                                "sharded with FSDP2 after this ShardedOptimizer was built; use the dist8 optimizer "
                                "directly with FSDP2 instead of ShardedOptimizer (nothing was updated)")
            what = (f"parameter {self._name_of(removed[0])} was removed from" if removed else
                    f"parameter {self._name_of(next(p for i, p in now.items() if i not in members))} was put in")
            raise ValueError(f"{what} param group {gi} after the ShardedOptimizer was built: its block layout is fixed "
                             "when it is built, so the change would not take effect. To stop training a parameter, "
                             "freeze it (requires_grad_(False): one without a gradient is skipped, as torch skips "
                             "it); otherwise build a new ShardedOptimizer (nothing was updated)")

    def _refuse_master_weight_bits_over_copies(self) -> None:
        """Built with ``master_weight_bits=None``, 16-bit parameters have fp32 master copies, which the inner
        optimizer steps and for which the setting means nothing: a 24/32 written into the groups later
        changed nothing, silently, where the unsharded optimizer keeps a correction (the load refuses it too)."""
        if all(copy is None for copy in self.masters):
            return
        for gi, group in enumerate(self.param_groups):
            bits = group.get("master_weight_bits")
            if bits is not None:
                raise ValueError(f"param group {gi} has master_weight_bits={bits!r}, but this ShardedOptimizer was "
                                 "built with master_weight_bits=None and keeps fp32 master copies of its 16-bit "
                                 f"parameters, which the setting cannot replace: build it with master_weight_bits="
                                 f"{bits!r} (nothing was updated)")

    def _refuse_gradients_outside_the_layout(self) -> None:
        """A parameter frozen when the optimizer was built has no place in the layout: a gradient
        it got after being unfrozen would never be applied (silently), so the step is refused, on
        every rank alike (one small all-reduce per step, only when some parameter was left out)."""
        if not self._outside_layout:
            return
        found = max((i + 1 for i, (p, _) in enumerate(self._outside_layout) if p.grad is not None), default=0)
        if self.world_size > 1:
            flag = torch.tensor([found], dtype=torch.int64, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            found = int(flag[0])
        if found:
            raise ValueError(f"parameter {self._outside_layout[found - 1][1]} did not require grad when the "
                             "ShardedOptimizer was built, so it has no place in its layout, and now has a gradient; "
                             "build the ShardedOptimizer after unfreezing it (nothing was updated)")

    # ---- gradient handling --------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally (no communication) inside this context (stage 2)."""
        previous, self._accumulating = self._accumulating, True
        try:
            yield
        finally:
            self._accumulating = previous

    @property
    def accumulate(self) -> bool:
        """While True, backward passes only accumulate gradients (same as :meth:`no_sync`)."""
        return self._accumulating

    @accumulate.setter
    def accumulate(self, value: bool) -> None:
        self._accumulating = bool(value)

    def _all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        dist.all_reduce(values, group=self.group)
        return values.cpu()

    def _prepare_grads(self) -> None:
        """Give every owned piece its averaged gradient (stage 2: reduce the buckets first)."""
        if self._superseded_by is not None:
            raise RuntimeError(f"this ShardedOptimizer was superseded: a newer one was built over its parameter "
                               f"{self._superseded_by} and took its parameters over; step that one (nothing was "
                               "updated)")
        if getattr(self, "_grads_ready", False):
            return
        # What this rank alone sees (its groups, its parameters, its gradients) is checked first and refused on
        # every rank together, with any setting that differs between ranks (agree_every_step): one rank refusing
        # alone left the others waiting in the step's collectives forever.
        local_error: Exception | None = None
        try:
            self._refuse_edited_groups()
            self._refuse_master_weight_bits_over_copies()
            self.adopt_parameters()
            if self.stage2_grads is None:
                self._refuse_unusable_replicated_grads()
        except (ValueError, TypeError, RuntimeError) as exc:
            local_error = exc
        if local_error is not None and self.world_size == 1:
            raise local_error
        grads = self.stage2_grads
        has_grad = None
        if grads is not None:
            # first: it launches the buckets backward left unlaunched here (a branch used on another rank only
            # had its bucket launched there during backward); an all-reduce before it paired with those
            # reductions on the other rank, and every rank hung. A local refusal rides on its all-reduce.
            has_grad = grads.present_on_any_rank(self.device, refused=local_error)
            try:
                self._agree_on_settings(None)
                self._refuse_gradients_outside_the_layout()
            except (ValueError, TypeError, RuntimeError):
                if self.world_size > 1:
                    grads.buckets.flush()  # no reduction left writing into a buffer zero_grad() clears next
                raise
            grads.reduce()
        else:
            self._agree_on_settings(local_error)
            self._refuse_gradients_outside_the_layout()
            if self.world_size > 1 and not self._stage1_grads_checked:
                self._refuse_gradients_not_averaged()
        for piece, view in zip(self.pieces, self._piece_views):
            p = self.params[piece.param]
            if grads is not None:
                if not has_grad[piece.param]:  # no rank has a gradient for it: skipped, as torch does
                    view.grad = None
                    continue
                grad = grads.view(piece.param, piece.start, piece.numel)
            elif p.grad is None:
                view.grad = None
                continue
            else:
                grad = p.grad.reshape(-1)[piece.start : piece.stop]
            view.grad = grad.float() if self.masters[self._buffer_of[piece.param]] is not None else grad
        self._grads_ready = True

    def _agree_on_settings(self, local_error: Exception | None) -> None:
        """Every rank steps with the same param-group values and overrides, or every rank refuses (one small
        all-reduce per step, :func:`~dist8.shard.agreement.agree_every_step`). They were compared when the
        optimizer was built only: a scheduler stepped on one rank, or a group edited there, trained each rank's
        blocks with that rank's values, silently, and a change refused on one rank alone left the others
        waiting in the step's collectives."""
        if self.world_size == 1:
            if local_error is not None:
                raise local_error
            return
        rows = [(f"param group {gi}'s {key}", _numbers_as_floats(comparable(value, read_device_tensors=False)))
                for gi, group in enumerate(self.param_groups) for key, value in sorted(group.items())
                if key != "params"]
        rows += [(f"parameter {name}'s override",
                  _numbers_as_floats(comparable(getattr(p, OVERRIDE_ATTR), read_device_tensors=False)))
                 for p, name in zip(self.params, self.names) if getattr(p, OVERRIDE_ATTR, None) is not None]
        agree_every_step(rows, local_error, self.group, self.device, "ShardedOptimizer.step()")

    def _refuse_unusable_replicated_grads(self) -> None:
        """Stage 1: every parameter's gradient is checked on every rank, before any collective, as the
        unsharded optimizer checks them. Only the rank owning a piece used to refuse it, with torch's
        words (a sparse gradient cannot be sliced), the others going on into the step's collectives;
        the gradients are the same on every rank (averaged), so every rank now gives the same verdict."""
        for p, name in zip(self.params, self.names):
            if p.grad is not None:
                check_gradient(p, lambda _, name=name: name)

    def _follow_marks(self) -> None:
        """Give each piece its parameter's mark as it is now: ``GlobalOptimManager.override_config`` after the
        first step applies from the next, as on the unsharded optimizer (the pieces had the marks copied at
        construction and kept them), and a module's mark restored on a replaced weight reaches its pieces."""
        restore_module_marks()
        for piece, view in zip(self.pieces, self._piece_views):
            mark = getattr(self.params[piece.param], OVERRIDE_ATTR, None)
            if view.__dict__.get(OVERRIDE_ATTR) is not mark:
                if mark is None:
                    view.__dict__.pop(OVERRIDE_ATTR, None)
                else:
                    setattr(view, OVERRIDE_ATTR, mark)

    def _check_settings_change(self) -> None:
        """On several ranks, check every piece's state against its settings on every rank alike (one
        all-reduce) at the first step, after a load, and when the marks or the group values the state
        depends on changed (:class:`~dist8.optim.settings_watch.SettingsWatch`) -- a change every rank
        sees. A change the state cannot follow (``optim_bits`` after the first step, percentile clipping
        without its history) is then refused on every rank, naming the parameter: the inner step refused
        it on the ranks owning a piece of it only, and the others went on into the step's collectives
        and waited there."""
        if not self._settings_watch.changed(self.params, self.param_groups):
            return
        if self.world_size > 1:
            with failures_on_every_rank(self.group, "ShardedOptimizer.step", ValueError):
                self.inner.check_states_fit(fix=SHARDED_STATE_FIX)
        self._settings_watch.accept()

    def _refuse_gradients_not_averaged(self) -> None:
        """Stage 1, first step with gradients: refuse gradients that differ between ranks (no DDP)."""
        grads = [p.grad for p in self.params]
        index = first_difference(gradient_fingerprints(grads, self.device), self.group)
        if index is not None:
            raise RuntimeError(
                f"ShardedOptimizer(stage=1) takes gradients already averaged across ranks (DDP averages them), but "
                f"parameter {self.names[index]}'s gradient differs between ranks: each rank's blocks would be "
                "trained on its own batch alone. Wrap the model in DistributedDataParallel, or use stage=2, which "
                "averages the gradients itself during backward; nothing was updated")
        self._stage1_grads_checked = any(g is not None for g in grads)

    @eager_only  # collectives on the gradient views: never traced
    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the global gradient (all ranks' blocks) to ``max_norm``; returns the total norm.

        Same formula as ``torch.nn.utils.clip_grad_norm_``; call it after backward, before step.
        """
        if norm_type != 2.0:
            raise ValueError(f"only norm_type=2 is supported, got {norm_type}")
        self._prepare_grads()
        local = torch.zeros(1, dtype=torch.float64)
        for view in self._piece_views:
            if view.grad is not None:
                local += view.grad.double().square().sum().cpu()
        total = self._all_reduce_sum(local) if self.world_size > 1 else local
        total_norm = total.sqrt().float()[0]
        coef = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        for view in self._piece_views:
            if view.grad is not None:
                view.grad.mul_(coef.to(view.grad.device))
        return total_norm

    # ---- step -----------------------------------------------------------------------
    def _sync_hyper(self, to_inner: bool) -> None:
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            for key in inner:
                if key in PARAM_LIST_KEYS:  # the inner groups list pieces, the outer ones parameters
                    continue
                if to_inner:
                    inner[key] = outer[key]
                else:
                    outer[key] = inner[key]

    @property
    def _step_supports_amp_scaling(self) -> bool:
        # torch.amp.GradScaler's protocol, as the inner optimizer's amp_unscale says (dist8.optim.amp):
        # True makes the scaler set grad_scale/found_inf and let step() unscale (see step).
        return self.inner.amp_unscale == "kernel"

    def make_fresh_state(self) -> None:
        """Give every piece without state the state its first step would create (zero moments, ``step`` 0),
        on every rank, stepping nothing: what torch.distributed.checkpoint's state initialisation asks of
        ``step()`` (its zero-gradient ``lr=0`` step set every ``step`` counter to 1 and put zeros into
        percentile clipping's history: :mod:`dist8.optim.dcp_init`)."""
        self.inner.make_fresh_state(self._piece_views)
        self._has_state = True  # on every rank alike (see state)

    @eager_only  # host-driven collectives into the flat buffers: never traced (see the docstring)
    @torch.no_grad()
    def step(self, closure=None):
        """Update this rank's blocks, then all-gather the parameters.

        Runs eagerly under ``torch.compile`` (a graph break): traced, the step moved parameters by
        10x the learning rate, silently (stage 2, 2 ranks).

        Under ``torch.amp.GradScaler`` (stage 1, or a single rank) the scaler's
        ``found_inf`` and ``grad_scale`` go to the inner optimizer, which skips the
        step or unscales inside its kernels. Stage 2 on several ranks refuses the
        scaler: its gradients are still being reduced when the scaler reads them.
        """
        # torch DCP's zero-gradient lr=0 step (only ever on an optimizer without state): make the state, step nothing
        if not self._has_state and called_by_dcp_init():
            self.make_fresh_state()
            return None
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and self.stage == 2 and self.world_size > 1:
            raise RuntimeError(
                "ShardedOptimizer(stage=2) on several ranks cannot be stepped by torch.amp.GradScaler: the scaler "
                "reads the gradients while they are still being reduced. Use stage=1 under DDP, or bf16 autocast "
                "(no scaler needed); nothing was updated"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gathered_state = None  # the state changes now
        self._prepare_grads()
        self._follow_marks()
        self._sync_hyper(to_inner=True)
        self._check_settings_change()
        if found_inf is not None:
            self.inner.grad_scale, self.inner.found_inf = getattr(self, "grad_scale", None), found_inf
        try:
            self._step_inner()
            self._has_state = True  # on every rank alike (see state)
            self.steps_taken += 1
        finally:
            if found_inf is not None:
                del self.inner.grad_scale, self.inner.found_inf
        self._grads_ready = False
        if self.stage2_grads is not None:
            self.stage2_grads.stepped()
        self.masters.write_back()
        self._all_gather_params()
        return loss

    def _step_inner(self) -> None:
        """The inner optimizer's step without torch's hook-running wrapper (its class's ``step``): step
        hooks, global ones included, run once, around this optimizer's step (its own wrapper), so post
        hooks see the parameters after the all-gather, not this rank's half-updated ones."""
        step = type(self.inner).step
        if getattr(step, "hooked", False):  # torch.optim.Optimizer.profile_hook_step's, functools.wraps'
            step = step.__wrapped__
        step(self.inner)

    def _all_gather_params(self) -> None:
        """Every rank's updated range, broadcast by its owner straight into the flat buffer.

        Broadcasting in place needs no staging buffer and, on gloo, measured ~5x faster
        than ``all_gather`` of the same bytes (bench notes in BENCHMARKS.md).
        """
        if self.world_size == 1:
            return
        works = []
        for buf, chunk in zip(self.buffers, self.gather_chunks):
            for r, (lo, hi) in enumerate(buf.rank_ranges):
                for a in range(lo, hi, chunk):
                    b = min(a + chunk, hi)
                    src = r if self.group is None else dist.get_global_rank(self.group, r)
                    works.append(dist.broadcast(buf.flat[a:b], src=src, group=self.group, async_op=True))
                    if r == self.rank:
                        self.bytes_gathered += (b - a) * buf.flat.element_size() * (self.world_size - 1)
        for work in works:
            work.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero gradients. Stage 2 keeps gradients as views of its flat buffer and zeroes it in place."""
        self._grads_ready = False
        if self.stage2_grads is not None:
            self.stage2_grads.zero(set_to_none)
        else:
            for p in self.params:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()
        for view in self._piece_views:
            view.grad = None

    # ---- introspection and state ------------------------------------------------------
    def state_nbytes(self) -> int:
        """Bytes of optimizer state on this rank (codes, absmax, 32-bit state, correction, fp32 master)."""
        return self.inner.state_nbytes() + self.master_nbytes()

    def master_nbytes(self) -> int:
        """Bytes of this rank's fp32 master copies (0 with fp32 parameters or ``master_weight_bits``)."""
        return self.masters.nbytes()

    def grad_buffer_nbytes(self) -> int:
        """Bytes of the stage-2 flat gradient buffers (the whole model's gradients; 0 at stage 1)."""
        return self.stage2_grads.nbytes() if self.stage2_grads is not None else 0

    @property
    def nonfinite_skips(self) -> int:
        """This rank's non-finite skips (blocks, or whole parameters with ``on_nonfinite="skip_param"``); their
        sum over ranks is the unsharded run's count."""
        return self.inner.nonfinite_skips

    @property
    def last_nonfinite(self) -> list[str]:
        """Names of the parameters with a skip counted by this rank in the last step."""
        return self.inner.last_nonfinite

    def nonfinite_skips_by_param(self) -> dict[str, int]:
        """``{parameter name: skips}`` counted by this rank (same units as :attr:`nonfinite_skips`)."""
        return self.inner.nonfinite_skips_by_param()

    @property
    def amp_skips(self) -> int:
        """Steps skipped because torch.amp.GradScaler found inf/NaN."""
        return self.inner.amp_skips

    def shard_state(self) -> dict[int, dict[str, Any]]:
        """This rank's state: global parameter index -> state of its owned piece."""
        out = {}
        for piece, view in zip(self.pieces, self._piece_views):
            if self.inner.state.get(view):
                out[piece.param] = self.inner.state[view]
        return out

    @property
    def state(self) -> state_dicts.OwnedState:
        """Parameter -> the state of this rank's piece of it (read-only view; true once the optimizer has
        state on any rank)."""
        owned = {self.params[piece.param]: self.inner.state[view]
                 for piece, view in zip(self.pieces, self._piece_views) if self.inner.state.get(view)}
        return state_dicts.OwnedState(owned, self._has_state)

    @state.setter
    def state(self, value: Any) -> None:  # torch.optim.Optimizer.__init__ assigns an empty dict
        self._has_state = bool(value)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (per-parameter piece state plus the layout it belongs to), or with
        ``full_state_dict=True`` the whole state in the unsharded optimizer's format on every rank
        (collective). torch.distributed.checkpoint's ``get/set_optimizer_state_dict`` (on every rank)
        always get the whole state: a shard under the parameters' names would be taken for replicated
        tensors; an optimizer without state first gets it as DCP gives torch's optimizers theirs.

        Runs the hooks of ``register_state_dict_pre_hook``/``post_hook`` as torch's optimizers do.
        """
        if called_by_dcp():
            if not self._has_state:  # DCP needs state to load into (stage 2's .grad views skip its own init)
                self.make_fresh_state()
            return state_dict_with_hooks(self, self._full_state_dict)
        if self.full_state_dict:
            return state_dict_with_hooks(self, self._full_state_dict)
        return state_dict_with_hooks(self, lambda: state_dicts.shard_format(self))

    def prepare_full_state_dict(self) -> None:
        """Gather the whole state now (collective), so that the next :meth:`state_dict` of a
        ``full_state_dict=True`` optimizer needs no collective, until the next step or load: for
        clients that call ``state_dict()`` on rank 0 only (HF Trainer; see
        :class:`dist8.integrations.hf_trainer.ShardedStateDictCallback`), where a collective there
        would wait for the other ranks forever."""
        from dist8.shard.collectives import all_gather_state

        self._gathered_state, self.last_state_bytes_sent = all_gather_state(self)

    def _full_state_dict(self) -> dict[str, Any]:
        if self._gathered_state is None:
            if self.world_size > 1:
                from dist8.shard.collectives import wait_for_every_rank

                wait_for_every_rank(self.group, self.device, "ShardedOptimizer.state_dict() (full_state_dict=True)",
                                    "A client that calls state_dict() on rank 0 only (HF Trainer) needs "
                                    "prepare_full_state_dict() on every rank first: "
                                    "dist8.integrations.hf_trainer.ShardedStateDictCallback does that.")
            self.prepare_full_state_dict()
        return state_dicts.unsharded_format(self, self._gathered_state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`: a shard saved by the same rank of the same world size, or a full
        one (``full_state_dict=True``, :meth:`consolidated_state_dict`, or the unsharded dist8
        optimizer's own) at any world size, each rank taking its blocks.

        To reshard files use :mod:`dist8.checkpoint` (which re-slices blocks).
        Runs the hooks of ``register_load_state_dict_pre_hook``/``post_hook`` as torch's
        optimizers do (post hooks only after a successful load).
        """
        load_state_dict_with_hooks(self, state_dict, lambda sd: state_dicts.load(self, sd))

    def load_shard_state(self, shard_state: dict[int, dict[str, Any]], copy: bool = True) -> None:
        """Install per-piece state (global parameter index -> state): :meth:`check_shard_state`, then
        :meth:`install_shard_state` (a refusal changes nothing). ``copy=False`` installs the tensors
        themselves: for state that is the caller's alone (received, read from a file)."""
        self.install_shard_state(self.check_shard_state(shard_state, copy))

    def check_shard_state(self, shard_state: dict[int, dict[str, Any]],
                          copy: bool = True) -> dict[int, dict[str, Any]]:
        """Check every piece's state (shapes, and the correction's dtype against ``master_weight_bits``,
        via the inner optimizer) and return it ready for :meth:`install_shard_state`; raises naming the
        parameter, with the optimizer's state untouched. ``copy`` as in :meth:`load_shard_state`."""
        # first (every state load comes here): weights a client loaded into copies of the parameters
        # (accelerate), taken back after, would reset the corrections just loaded
        self.adopt_parameters()
        group_of = {view: g for g in self.inner.param_groups for view in g["params"]}
        checked = {}
        for piece, view in zip(self.pieces, self._piece_views):
            st = shard_state.get(piece.param)
            if st is not None:
                correction = self.inner.settings(view, group_of[view]).correction
                checked[piece.param] = self.inner.check_state(view, st, correction=correction, copy=copy)
        return checked

    def install_shard_state(self, checked: dict[int, dict[str, Any]]) -> None:
        """Make ``checked`` (from :meth:`check_shard_state`) the state: pieces it lacks get none."""
        self._gathered_state = None
        for piece, view in zip(self.pieces, self._piece_views):
            if piece.param in checked:
                self.inner.state[view] = checked[piece.param]
            else:
                self.inner.state.pop(view, None)
        self._has_state = True  # every rank loads (see state)
        self.masters.versions = None  # masters a load installs meet the parameters at the next look
        self._settings_watch.forget()  # the loaded state meets the settings at the next step, on every rank

    @torch.no_grad()
    def load_fp32_master(self, weights: dict[int, torch.Tensor]) -> None:
        """Set parameters (global index -> fp32 tensor of its shape) from fp32 master values; collective.

        Each rank encodes its owned pieces and then every rank's range is broadcast, as after a step.
        bf16/fp16 parameters with ``master_weight_bits``: the owned parameter values and corrections
        are :func:`dist8.quant.master.encode_master_exact` of the masters, so the next step continues
        from the fp32 values; with the fp32 master copy, the owned range of the copy takes them; fp32
        parameters take them as they are. Other state is kept (fresh state created where there was none).
        """
        from dist8.quant.master import encode_master, encode_master_exact

        self.adopt_parameters()  # first: the values go into the buffers the parameters view
        group_of = {view: g for g in self.inner.param_groups for view in g["params"]}
        for piece, view in zip(self.pieces, self._piece_views):
            if piece.param not in weights:
                continue
            master = weights[piece.param].reshape(-1)[piece.start : piece.stop].float().contiguous()
            dtype = self.params[piece.param].dtype
            settings = self.inner.settings(view, group_of[view])
            rounded, correction = master, None
            if settings.correction is not None:
                bits = 24 if settings.correction == torch.int8 else 32
                rounded, correction = encode_master_exact(master, dtype, bits)
            elif dtype != torch.float32:  # round to nearest even, saturating
                rounded = encode_master(master, dtype, 24)[0]
            self._flat(piece.param, piece.start, piece.numel).copy_(rounded)
            if settings.correction is not None:
                if not self.inner.state.get(view):
                    self.inner.state[view] = self.inner.init_state(view, settings)
                self.inner.state[view][CORRECTION] = correction
            elif self.master_piece(piece) is not None:
                view.copy_(master)
        self._all_gather_params()

    def consolidated_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """The full state on rank ``dst`` (``None`` elsewhere), in the unsharded optimizer's format.

        Loads into ``optimizer_class(model.parameters(), ...)`` on one process. Codes
        and absmax travel as they are (see :mod:`dist8.shard.collectives`).
        """
        from dist8.shard.collectives import gather_state

        full, sent = gather_state(self, dst)
        self.last_state_bytes_sent = sent
        if full is None:
            return None
        return state_dicts.unsharded_format(self, full)

    def __repr__(self) -> str:
        return (f"ShardedOptimizer({self.optimizer_class.__name__}, stage={self.stage}, rank {self.rank}/"
                f"{self.world_size}, {len(self.pieces)} pieces, blocks "
                f"{self.layout.block_ranges(self.world_size)[self.rank]})")
