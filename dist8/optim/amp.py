"""How a dist8 optimizer meets ``torch.amp.GradScaler`` (fp16 mixed precision): who unscales.

``amp_unscale="kernel"`` (default): the optimizer declares ``_step_supports_amp_scaling``,
torch's protocol that torch's fused AdamW uses. The scaler then checks the gradients,
leaves them scaled and always calls ``step()`` with ``grad_scale``/``found_inf`` set; the
step skips itself when any rank found inf/NaN (counted in ``amp_skips``) and otherwise
folds 1/scale into the kernels' gradient scale. No second pass over the gradients, and one
skip decision on every rank, FSDP2 shards included (the found-inf goes into the step's
all-reduce of partial sums).

``amp_unscale="scaler"``: torch's non-fused contract, that of bitsandbytes' and torchao's
optimizers. The scaler unscales the gradients in place (``scaler.unscale_``) and does not
call ``step()`` when it found inf/NaN. Clients that clip gradients only for such
optimizers need it: PyTorch Lightning refuses ``gradient_clip_val`` under ``16-mixed``
(and, up to 2.6, under ``bf16-mixed``) for optimizers that unscale themselves, and
accelerate's ``optimizer_step_was_skipped`` (HF Trainer's LR scheduler guard) can only see
a skip that leaves ``step()`` uncalled. Each rank's scaler decides alone, so it is refused
where ranks could decide differently: DTensor (FSDP2) parameters, ``ShardedOptimizer``
stage 2 on several ranks, and gradient release (the hooks step before the scaler checks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from dist8.messages import brief

if TYPE_CHECKING:
    from dist8.optim.base import Optimizer8bit

__all__ = ["AMP_UNSCALE_MODES", "check_amp_unscale", "amp_scaling"]

AMP_UNSCALE_MODES = ("kernel", "scaler")


def check_amp_unscale(mode: str) -> str:
    """Validate an ``amp_unscale`` value (ValueError naming it)."""
    if not isinstance(mode, str) or mode not in AMP_UNSCALE_MODES:
        raise ValueError(f"amp_unscale must be one of {AMP_UNSCALE_MODES}, got {brief(mode)}")
    return mode


def amp_scaling(opt: Optimizer8bit) -> tuple[float, bool] | None:
    """(1/scale, inf found) when torch.amp.GradScaler steps ``opt`` in ``"kernel"`` mode, else None.

    The scaler has checked every gradient of ``param_groups`` for inf/NaN
    (``found_inf``) and left them scaled by ``grad_scale`` (None once the user
    called ``scaler.unscale_``): the step is skipped whole when it found any, as
    torch's optimizers do, and otherwise the gradients are unscaled inside the kernels.
    """
    found_inf = getattr(opt, "found_inf", None)
    if found_inf is None:
        return None
    scale = getattr(opt, "grad_scale", None)
    inv_scale = 1.0 if scale is None else 1.0 / float(scale)
    return inv_scale, float(found_inf) > 0
