"""PyTorch Lightning with gradient release (needs ``lightning``).

Gradient release (:func:`dist8.gradient_release`) steps each parameter inside backward and frees
its gradient. Lightning's own gradient clipping (``Trainer(gradient_clip_val=...)``) runs after
backward, when no gradient is left: it clips nothing, silently (the run is bitwise the run
without clipping). :class:`GradientReleaseCallback` installs the release for ``fit()`` after
refusing the Trainer settings that cannot work with it::

    trainer = L.Trainer(..., callbacks=[GradientReleaseCallback(max_grad_norm_per_param=1.0)])
    trainer.fit(module)   # module.configure_optimizers returns one dist8 optimizer
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from dist8.integrations.trainer_release import ReleaseDuringTraining
from dist8.optim.release import GradientRelease

__all__ = ["GradientReleaseCallback"]


class GradientReleaseCallback(Callback):
    """Runs ``trainer.fit()`` with :func:`dist8.gradient_release` on the LightningModule and its one
    dist8 optimizer: each parameter steps inside backward and its gradient is freed at once.

    Args:
        max_grad_norm_per_param: clip each parameter's gradient to this L2 norm before its step (the
            per-parameter stand-in for ``gradient_clip_val``, which has to be off). Default None.
        weight_grad_chunk: elements per chunk of the Linear/Embedding weight gradients
            (:func:`dist8.gradient_release`). Default None (whole gradients).

    When fitting starts (after ``configure_optimizers``, before any step) it refuses, with a
    ValueError naming the setting: ``gradient_clip_val`` (Lightning clips after backward, when
    every gradient has been stepped and freed: it would clip nothing), ``accumulate_grad_batches``
    > 1 (each backward is a step), a GradScaler precision (``"16-mixed"``: the hooks would step with
    scaled, unchecked gradients; use ``"bf16-mixed"``), more or fewer than one optimizer, and several
    ranks without FSDP2 (DDP averages gradients after the hooks have stepped with the local ones).
    The release is removed when fitting ends or fails, so the optimizer steps normally outside
    ``fit()``.
    """

    def __init__(self, max_grad_norm_per_param: float | None = None, weight_grad_chunk: int | None = None) -> None:
        self.release = ReleaseDuringTraining(max_grad_norm_per_param, weight_grad_chunk)

    @property
    def handle(self) -> GradientRelease | None:
        """The active :class:`dist8.GradientRelease` during ``fit()``, else None."""
        return self.release.handle

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"GradientReleaseCallback needs configure_optimizers to return one dist8 optimizer, got "
                f"{len(trainer.optimizers)} optimizers")
        scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        self.release.start(pl_module, trainer.optimizers[0],
                           clip=("Trainer(gradient_clip_val=None)", trainer.gradient_clip_val),
                           accumulation=("Trainer(accumulate_grad_batches=1)", trainer.accumulate_grad_batches),
                           fp16_scaler=(f"Trainer(precision={trainer.precision!r})", "precision='bf16-mixed'")
                           if scaler else None,
                           world_size=trainer.world_size)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.release.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self.release.stop()
