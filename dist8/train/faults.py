"""Test-only fault injection for the training job (``train.fault_*`` keys, left out of the key lists users see).

- ``fault_kill_step``: rank ``fault_rank`` SIGKILLs itself right after that step, on the first
  attempt only (``TORCHELASTIC_RESTART_COUNT == 0``): the restart and resume tests.
- ``fault_nan_grad_step`` / ``fault_nan_grad_count``: rank ``fault_rank``'s loss gives NaN
  gradients (its value unchanged) in that many steps from that step on: every parameter's
  gradient is NaN after the reduction, on every rank, in every sharding mode.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

from dist8.train.config import Config

__all__ = ["maybe_kill", "maybe_nan_gradients"]


def maybe_kill(cfg: Config, step: int, rank: int) -> None:
    """SIGKILL this rank at ``train.fault_kill_step`` (first attempt only)."""
    t = cfg.train
    if t.fault_kill_step is not None and step == t.fault_kill_step and rank == t.fault_rank:
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
            print(f"[dist8 train] fault injection: rank {rank} SIGKILLs itself at step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


class _NanGradient(torch.autograd.Function):
    """Identity forward; NaN gradient backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        return torch.full_like(grad, float("nan"))


def maybe_nan_gradients(cfg: Config, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    """``loss``, made to give NaN gradients when ``train.fault_nan_grad_step`` says so for this step and rank."""
    t = cfg.train
    first = t.fault_nan_grad_step
    if first is None or rank != t.fault_rank or not first <= step < first + t.fault_nan_grad_count:
        return loss
    return _NanGradient.apply(loss)
