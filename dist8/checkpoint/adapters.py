"""A uniform view of what a checkpoint needs from each kind of optimizer.

``ShardedOptimizer``: each rank owns pieces (whole-block ranges) of parameters.
A plain dist8 optimizer: one rank (rank 0 when distributed) owns every parameter
whole; other ranks hold replicas and only load.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist8.checkpoint.names import parameter_names, state_dict_by_name
from dist8.optim.base import Optimizer8bit
from dist8.optim.config import hyperparameters_of
from dist8.optim.dtensor_layout import full_tensor
from dist8.optim.state_schema import CORRECTION, STATE_DICT_INFO, is_state_key, state_dict_info
from dist8.shard import BlockLayout, Piece, ShardedOptimizer

__all__ = ["FSDP2Adapter", "OptimizerAdapter", "adapt"]


def _shaped(key: str) -> bool:
    """State tensors with the parameter's shape (stored flat): states and the master-weight correction."""
    return is_state_key(key) or key == CORRECTION


@dataclass
class OptimizerAdapter:
    layout: BlockLayout
    rank: int
    world_size: int
    group: Any
    pieces: list[Piece]  # pieces this rank saves and loads
    writes: bool  # whether this rank writes a shard file
    optimizer: Any
    params: list[torch.Tensor]
    inner: Optimizer8bit
    wrapped: bool = False  # model names with the wrappers' components (checkpoints before names.py)
    alone: bool = False  # saved by this rank without collectives (replica_groups.writer_adapter)

    @functools.cached_property
    def names(self) -> list[str]:
        """Parameter names in layout order (built once: read per piece, rebuilt it made loads quadratic)."""
        return [p.name for p in self.layout.params]

    def piece_state(self, i: int) -> dict[str, Any] | None:
        if isinstance(self.optimizer, ShardedOptimizer):
            return self.optimizer.shard_state().get(i)
        st = self.inner.state.get(self.params[i])
        return st or None

    def master_piece(self, piece: Piece) -> torch.Tensor | None:
        opt = self.optimizer
        return opt.master_piece(piece) if isinstance(opt, ShardedOptimizer) else None

    def load_states(self, states: dict[int, dict[str, Any]], masters: dict[int, torch.Tensor]) -> None:
        opt = self.optimizer
        if isinstance(opt, ShardedOptimizer):
            opt.load_shard_state(states, copy=False)  # read from the checkpoint: ours alone
            opt.refresh_masters()
            for piece in self.pieces:
                master = opt.master_piece(piece)
                if master is not None and piece.param in masters:
                    master.copy_(masters[piece.param])
            return
        group_of = {p: g for g in self.inner.param_groups for p in g["params"]}
        checked = {}
        for i, st in states.items():
            p = self.params[i]
            st = {k: (v.view(p.shape) if _shaped(k) else v) for k, v in st.items()}
            checked[p] = self.inner.check_loaded_state(  # the groups hold the loaded values already
                p, st, self.inner.settings(p, group_of[p]), "the checkpoint's state does not fit this optimizer's "
                "settings; nothing was loaded", copy=False)  # read from the file: ours alone
        for p in self.params:  # the checkpoint's state, as load_state_dict gives it: none where it has none
            if p in checked:
                self.inner.state[p] = checked[p]
            else:
                self.inner.state.pop(p, None)

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Model tensors to write (rank 0); the writer (:mod:`dist8.checkpoint.model_file`) folds tied
        weights and copies to the CPU."""
        return dict(state_dict_by_name(model, self.wrapped))  # the writer checks and detaches

    def load_model_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        own = state_dict_by_name(model, self.wrapped)
        with torch.no_grad():
            for name, value in tensors.items():
                if name in own:
                    own[name].copy_(value)

    def effective_block(self, i: int) -> int:
        """Quantization block size the optimizer uses for parameter ``i`` (differs from the layout's
        only with ``block_wise=False``, where each parameter is one block)."""
        inner = self.inner
        if inner.block_wise:
            return inner.block_size
        if isinstance(self.optimizer, ShardedOptimizer):
            views = {idx: view for view, idx in (inner.global_slots or ({}, 0))[0].items()}
            p = views.get(i)
        else:
            p = self.params[i]
        if p is None:  # this rank holds no piece of the parameter: it neither writes nor reads its state
            return inner.block_size
        group = next(g for g in inner.param_groups if any(q is p for q in g["params"]))
        return inner.settings(p, group).block_size

    def snapshot(self) -> Any:
        """What :meth:`restore` needs to undo :meth:`load_states` and a param-group update."""
        opt = self.optimizer
        masters = opt.masters_snapshot() if isinstance(opt, ShardedOptimizer) else None
        return dict(self.inner.state), [dict(g) for g in opt.param_groups], masters

    def restore(self, snap: Any) -> None:
        state, groups, masters = snap
        self.inner.state.clear()
        self.inner.state.update(state)
        for g, saved in zip(self.optimizer.param_groups, groups):
            g.clear()
            g.update(saved)
        if masters is not None:
            self.optimizer.restore_masters(masters)

    def hyper(self) -> list[dict[str, Any]]:
        return [hyperparameters_of(g) for g in self.optimizer.param_groups]

    def group_index(self) -> dict[int, int]:
        """``id(parameter)`` -> the index of its (first) param group, in one pass over the groups."""
        index: dict[int, int] = {}
        for gi, g in enumerate(self.optimizer.param_groups):
            for q in g["params"]:
                index.setdefault(id(q), gi)
        return index

    def group_of(self) -> list[int]:
        """The param-group index of each parameter in a group, in parameter order."""
        index = self.group_index()
        return [index[id(p)] for p in self.params if id(p) in index]


class FSDP2Adapter(OptimizerAdapter):
    """A dist8 optimizer on FSDP2 (DTensor) parameters.

    Saving gathers the *full* quantized state (uint8 codes + fp32 absmax; never fp32
    moments) onto rank 0, tensor by tensor (int16 corrections as uint8 pairs), and the model
    with torch's full-state-dict API, and writes a world-size-1 checkpoint; loading gives every
    rank the full state, and the optimizer's ``load_state_dict`` keeps the blocks of its shard. For sharded reads at scale use
    :func:`dist8.integrations.fsdp.save_dcp`, which stores the same codes through DCP.
    """

    full: dict[str, Any] | None = None

    def gather(self, model: torch.nn.Module) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        keep = self.rank == 0  # rank 0 of the mesh writes
        # torch's cpu_offload keeps the full tensors on the world's rank 0 alone: a mesh of part of the world
        # (a pipeline stage's, replica_groups.writer_adapter) gathers them onto each of its ranks instead
        offload = self.group is None
        full_model = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        self.full_model = {k: v.cpu() for k, v in full_model.items()} if keep else {}
        del full_model
        # the optimizer's sharded dict, gathered here tensor by tensor: torch's full_state_dict gather
        # all-gathers master_weight_bits=32's int16 corrections, which gloo cannot ("Invalid scalar type")
        sharded = get_optimizer_state_dict(model, self.optimizer)
        state = {}
        for name, st in sharded.get("state", {}).items():
            whole = {k: full_tensor(v) for k, v in st.items()}  # collective: every rank takes part
            if keep:
                state[name] = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in whole.items()}
        self.full = {"state": state, "param_groups": sharded.get("param_groups", [])} if keep else None

    def piece_state(self, i: int) -> dict[str, Any] | None:
        st = (self.full or {}).get("state", {}).get(self.names[i])
        return st or None

    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.full_model.items()}

    def load_model_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))

    def load_states(self, states: dict[int, dict[str, Any]], masters: dict[int, torch.Tensor]) -> None:
        # Every rank read the whole state: the optimizer's own load_state_dict keeps each rank's blocks
        # (dtensor.localize_state slices global tensors, no collective moves state). torch's
        # set_optimizer_state_dict(full_state_dict=True) scattered each tensor from rank 0 instead, which
        # gloo cannot do for master_weight_bits=32's int16 corrections ("Invalid scalar type").
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        index = {id(p): k for k, p in enumerate(order)}
        state = {}
        for i, st in states.items():
            shape = self.layout.params[i].shape
            state[index[id(self.params[i])]] = {k: (v.view(shape) if _shaped(k) else v) for k, v in st.items()}
        groups = [dict(hyperparameters_of(g), params=[index[id(p)] for p in g["params"]])
                  for g in self.optimizer.param_groups]
        # as load_state_dict gives it: a parameter the checkpoint has no state for has none
        self.optimizer.load_state_dict({"state": state, "param_groups": groups,
                                        STATE_DICT_INFO: state_dict_info(self.inner.quant_map, self.inner.rule)})


def adapt(model: torch.nn.Module | None, optimizer, wrapped: bool = False) -> OptimizerAdapter:
    """Describe ``optimizer`` (sharded or plain) with parameter names taken from ``model`` when given
    (without the wrappers' components, :mod:`dist8.checkpoint.names`, unless ``wrapped``)."""
    model_names = parameter_names(model, wrapped) if model is not None else {}
    if isinstance(optimizer, ShardedOptimizer):
        params = optimizer.params
        names = [model_names.get(p, n) for p, n in zip(params, optimizer.names)]
        layout = BlockLayout(names, [p.shape for p in params], optimizer.layout.block_size)
        return OptimizerAdapter(layout, optimizer.rank, optimizer.world_size, optimizer.group, optimizer.pieces,
                                True, optimizer, params, optimizer.inner, wrapped)
    if isinstance(optimizer, Optimizer8bit) and optimizer.uses_dtensor:
        if model is None:
            raise TypeError("dist8.checkpoint needs the model for an optimizer of FSDP2 (DTensor) parameters")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = [model_names[p] for p in params]
        layout = BlockLayout(names, [p.shape for p in params], optimizer.block_size)
        rank = dist.get_rank() if dist.is_initialized() else 0
        ad = FSDP2Adapter(layout, rank, dist.get_world_size() if dist.is_initialized() else 1, None,
                          layout.pieces(0, 1), rank == 0, optimizer, params, optimizer)
        ad.model = model
        return ad
    if isinstance(optimizer, Optimizer8bit):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = [model_names.get(p) or optimizer.param_names.get(p, f"param{i}")
                 for i, p in enumerate(params)]
        layout = BlockLayout(names, [p.shape for p in params], optimizer.block_size)
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else 0
        pieces = layout.pieces(0, 1)
        return OptimizerAdapter(layout, rank, dist.get_world_size() if initialised else 1, None, pieces, rank == 0,
                                optimizer, params, optimizer, wrapped)
    raise TypeError(f"dist8.checkpoint supports dist8 optimizers and ShardedOptimizer, got {type(optimizer).__name__}")
