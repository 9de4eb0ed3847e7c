"""HF Trainer with :class:`dist8.ShardedOptimizer` under DDP (needs ``transformers``).

The Trainer saves ``optimizer.state_dict()`` on rank 0 only and loads that file on every rank.
A ``ShardedOptimizer(full_state_dict=True)`` can give rank 0 the whole state, but gathering it is
a collective, which rank 0 alone would wait on forever. :class:`ShardedStateDictCallback` gathers
it on every rank right before each save (``on_step_end`` with ``control.should_save``), so the
Trainer's own ``state_dict()`` call finds it ready::

    trainer = Trainer(..., optimizer_cls_and_kwargs=(dist8.ShardedOptimizer, {
                          "optimizer_class": dist8.AdamW8bit, "stage": 1, "full_state_dict": True, "lr": 3e-4}),
                      callbacks=[ShardedStateDictCallback()])
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from dist8.shard import ShardedOptimizer

__all__ = ["ShardedStateDictCallback"]


def _sharded(optimizer: Any) -> ShardedOptimizer | None:
    """The ShardedOptimizer inside accelerate's AcceleratedOptimizer (or given directly), else None."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return inner if isinstance(inner, ShardedOptimizer) else None


class ShardedStateDictCallback(TrainerCallback):
    """Gathers a :class:`dist8.ShardedOptimizer`'s whole state on every rank before each checkpoint.

    Refuses (ValueError, at the start of training) a ShardedOptimizer without
    ``full_state_dict=True``, whose rank-0 state dict would hold rank 0's blocks only. Does nothing
    for other optimizers.
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        opt = _sharded(optimizer)
        if opt is not None and not opt.full_state_dict and opt.world_size > 1:
            raise ValueError(
                "ShardedOptimizer under HF Trainer needs full_state_dict=True: the Trainer saves rank 0's "
                "optimizer.state_dict() only, which would hold rank 0's blocks alone"
            )
        return control

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = _sharded(optimizer)
        if opt is not None and opt.full_state_dict and control.should_save:
            opt.prepare_full_state_dict()  # collective, on every rank; rank 0's save then reads it
        return control
