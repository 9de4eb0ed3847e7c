"""HF Trainer with :class:`dist8.ShardedOptimizer` under DDP (needs ``transformers``).

The Trainer saves ``optimizer.state_dict()`` on rank 0 only and loads that file on every rank.
A ``ShardedOptimizer(full_state_dict=True)`` can give rank 0 the whole state, but gathering it is
a collective, which rank 0 alone would wait on forever. :class:`ShardedStateDictCallback` gathers
it on every rank right before each save (``on_step_end`` and ``on_epoch_end`` with ``control.should_save``,
and at each evaluation under ``save_strategy="best"``), so the
Trainer's own ``state_dict()`` call finds it ready::

    trainer = Trainer(..., optimizer_cls_and_kwargs=(dist8.ShardedOptimizer, {
                          "optimizer_class": dist8.AdamW8bit, "stage": 1, "full_state_dict": True, "lr": 3e-4}),
                      callbacks=[ShardedStateDictCallback()])

and gradient release (:func:`dist8.gradient_release`) under the Trainer:
:class:`GradientReleaseCallback` installs it when training starts and removes it when training
ends, after refusing the Trainer settings that cannot work with it (its global gradient clipping,
on by default, would see no gradients and clip nothing; gradient accumulation; fp16's GradScaler; DDP)::

    trainer = Trainer(..., args=TrainingArguments(..., max_grad_norm=0),
                      optimizer_cls_and_kwargs=(dist8.AdamW8bit, {"lr": 3e-4}),
                      callbacks=[GradientReleaseCallback(max_grad_norm_per_param=1.0)])
"""
from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from dist8.integrations.trainer_release import ReleaseDuringTraining
from dist8.optim.release import GradientRelease
from dist8.shard import ShardedOptimizer

__all__ = ["GradientReleaseCallback", "ShardedStateDictCallback"]


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

    # save_strategy="epoch" decides to save in on_epoch_end, after on_step_end: rank 0's save then waited for
    # the others forever. The Trainer's own flow callback runs before this one and has set should_save.
    on_epoch_end = on_step_end

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        # save_strategy="best" decides after the evaluation, once every callback has run: the state is
        # gathered at each evaluation (every rank evaluates), whether or not it turns out a new best
        opt = _sharded(optimizer)
        if opt is not None and opt.full_state_dict and str(getattr(args.save_strategy, "value",
                                                                   args.save_strategy)) == "best":
            opt.prepare_full_state_dict()
        return control


class GradientReleaseCallback(TrainerCallback):
    """Runs the Trainer's training with :func:`dist8.gradient_release`: each parameter steps inside
    backward and its gradient is freed at once (bytes per parameter: README, "Fewer bytes per parameter").

    Args:
        max_grad_norm_per_param: clip each parameter's gradient to this L2 norm before its step (the
            per-parameter stand-in for the Trainer's global clipping, which has to be off). Default None.
        weight_grad_chunk: elements per chunk of the Linear/Embedding weight gradients
            (:func:`dist8.gradient_release`). Default None (whole gradients).

    At the start of training (before any step) it refuses, with a ValueError naming the setting:
    ``TrainingArguments.max_grad_norm`` > 0 (the Trainer's default is 1.0: its clipping runs after
    backward, when every gradient has been stepped and freed, so it would clip nothing and log
    ``grad_norm`` 0), ``gradient_accumulation_steps`` > 1 (each backward is a step), ``fp16=True`` (its
    GradScaler would check gradients already stepped with; ``bf16=True`` works), and several
    ranks without FSDP2 (DDP averages gradients after the hooks have stepped with the local ones);
    :func:`dist8.gradient_release` refuses an optimizer that is not a dist8 optimizer. The release is
    removed when training ends (and replaced if ``train()`` is called again), so the optimizer steps
    normally outside ``trainer.train()``.
    """

    def __init__(self, max_grad_norm_per_param: float | None = None, weight_grad_chunk: int | None = None) -> None:
        self.release = ReleaseDuringTraining(max_grad_norm_per_param, weight_grad_chunk)

    @property
    def handle(self) -> GradientRelease | None:
        """The active :class:`dist8.GradientRelease` during training, else None."""
        return self.release.handle

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.release.start(model, optimizer,  # accelerate's wrapper: gradient_release takes the optimizer inside
                           clip=("TrainingArguments(max_grad_norm=0)", args.max_grad_norm),
                           accumulation=("TrainingArguments(gradient_accumulation_steps=1)",
                                         args.gradient_accumulation_steps),
                           fp16_scaler=("TrainingArguments(fp16=True)", "bf16=True") if args.fp16 else None,
                           world_size=args.world_size)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.release.stop()
        return control
