"""A uniform view of what a checkpoint needs from each kind of optimizer.

``ShardedOptimizer``: each rank owns pieces (whole-block ranges) of parameters.
A plain dist8 optimizer: one rank (rank 0 when distributed) owns every parameter
whole; other ranks hold replicas and only load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from dist8.optim.base import Optimizer8bit
from dist8.shard import BlockLayout, Piece, ShardedOptimizer

__all__ = ["OptimizerAdapter", "adapt"]


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

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.layout.params]

    def piece_state(self, i: int) -> dict[str, Any] | None:
        if isinstance(self.optimizer, ShardedOptimizer):
            return self.optimizer.shard_state().get(i)
        st = self.inner.state.get(self.params[i])
        return st or None

    def master_piece(self, piece: Piece) -> torch.Tensor | None:
        opt = self.optimizer
        if isinstance(opt, ShardedOptimizer) and opt.master is not None:
            start = opt.layout.element_offset(piece.param) + piece.start - opt.shard_lo
            return opt.master[start : start + piece.numel]
        return None

    def load_states(self, states: dict[int, dict[str, Any]], masters: dict[int, torch.Tensor]) -> None:
        opt = self.optimizer
        if isinstance(opt, ShardedOptimizer):
            opt.load_shard_state(states)
            if opt.master is not None:
                opt.master.copy_(opt.flat_param[opt.shard_lo : opt.shard_hi])
                for piece in self.pieces:
                    if piece.param in masters:
                        self.master_piece(piece).copy_(masters[piece.param])
            return
        for i, st in states.items():
            p = self.params[i]
            st = {k: (v.view(p.shape) if k.startswith("state") else v) for k, v in st.items()}
            self.inner.state[p] = self.inner._checked_state(p, st)

    def hyper(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def group_of(self) -> list[int]:
        out = []
        for p in self.params:
            for gi, g in enumerate(self.optimizer.param_groups):
                if any(q is p for q in g["params"]):
                    out.append(gi)
                    break
        return out


def adapt(model: torch.nn.Module | None, optimizer) -> OptimizerAdapter:
    """Describe ``optimizer`` (sharded or plain) with parameter names taken from ``model`` when given."""
    model_names = {p: n for n, p in model.named_parameters()} if model is not None else {}
    if isinstance(optimizer, ShardedOptimizer):
        params = optimizer._params
        names = [model_names.get(p, n) for p, n in zip(params, optimizer._names)]
        layout = BlockLayout(names, [p.shape for p in params], optimizer.layout.block_size)
        return OptimizerAdapter(layout, optimizer.rank, optimizer.world_size, optimizer.group, optimizer.pieces,
                                True, optimizer, params, optimizer.inner)
    if isinstance(optimizer, Optimizer8bit):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        names = [model_names.get(p) or (optimizer._names.get(p) if p in optimizer._names else f"param{i}")
                 for i, p in enumerate(params)]
        layout = BlockLayout(names, [p.shape for p in params], optimizer.block_size)
        initialised = dist.is_available() and dist.is_initialized()
        rank = dist.get_rank() if initialised else 0
        pieces = layout.pieces(0, 1)
        return OptimizerAdapter(layout, rank, dist.get_world_size() if initialised else 1, None, pieces, rank == 0,
                                optimizer, params, optimizer)
    raise TypeError(f"dist8.checkpoint supports dist8 optimizers and ShardedOptimizer, got {type(optimizer).__name__}")
