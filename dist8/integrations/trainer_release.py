"""What the trainers' ``GradientReleaseCallback`` s share (HF Trainer: :mod:`dist8.integrations.hf_trainer`,
Lightning: :mod:`dist8.integrations.lightning`): the check of the trainer's settings that cannot work
with gradient release, and the release installed for one training run.

Each trainer names its own settings; the rules are the same: its global gradient clipping runs after
backward, when every gradient has been stepped and freed (it would clip nothing, silently);
accumulation contradicts a step per backward; an fp16 GradScaler would check gradients already
stepped with; under DDP the hooks would step with each rank's local gradient before DDP averages it.
"""
from __future__ import annotations

from typing import Any

import torch

from dist8.optim.dtensor_layout import is_dtensor
from dist8.optim.release import GradientRelease, gradient_release

__all__ = ["ReleaseDuringTraining"]


class ReleaseDuringTraining:
    """Gradient release for one training run of a trainer.

    Args:
        max_grad_norm_per_param: passed to :func:`dist8.gradient_release` (per-parameter clipping,
            L2 norm). Default None (off).
        weight_grad_chunk: passed to :func:`dist8.gradient_release` (elements). Default None (off).
    """

    def __init__(self, max_grad_norm_per_param: float | None = None, weight_grad_chunk: int | None = None) -> None:
        self.max_grad_norm_per_param = max_grad_norm_per_param
        self.weight_grad_chunk = weight_grad_chunk
        self.handle: GradientRelease | None = None

    def start(self, model: torch.nn.Module, optimizer: Any, *, clip: tuple[str, Any], accumulation: tuple[str, int],
              fp16_scaler: tuple[str, str] | None, world_size: int) -> None:
        """Refuse the trainer's settings that cannot work (ValueError naming the setting, before anything
        is hooked), then install the release on ``model`` and ``optimizer``.

        ``clip``: (the setting that turns the trainer's clipping off, its value now);
        ``accumulation``: (the setting that makes one backward per step, its value now);
        ``fp16_scaler``: (the setting that asked for fp16 with a GradScaler, what to use instead), or None;
        ``world_size``: ranks of the run (several need an FSDP2 model: DTensor parameters)."""
        self.stop()  # a run that failed before its end hook: its release goes first
        off, value = clip
        if value:
            raise ValueError(
                f"GradientReleaseCallback needs {off}, got {value}: the trainer clips after backward, when gradient "
                "release has stepped and freed every gradient, so it would clip nothing; clip per parameter with "
                "GradientReleaseCallback(max_grad_norm_per_param=...)")
        one, steps = accumulation
        if steps > 1:
            raise ValueError(
                f"GradientReleaseCallback needs {one}, got {steps}: with gradient release each backward pass is an "
                "optimizer step")
        if fp16_scaler is not None:
            setting, instead = fp16_scaler
            raise ValueError(
                f"GradientReleaseCallback does not support {setting}: its GradScaler checks the gradients after the "
                f"release hooks have stepped with them; use {instead}")
        if world_size > 1 and not any(is_dtensor(p) for p in model.parameters()):
            raise ValueError(
                f"GradientReleaseCallback on {world_size} ranks needs an FSDP2 model: under DDP the release hooks "
                "would step with each rank's local gradient before DDP averages it")
        self.handle = gradient_release(model, optimizer, max_grad_norm_per_param=self.max_grad_norm_per_param,
                                       weight_grad_chunk=self.weight_grad_chunk)

    def stop(self) -> None:
        """Remove the release (the optimizer steps normally again); nothing if none is installed."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
