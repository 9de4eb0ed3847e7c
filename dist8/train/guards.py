"""What stops a training run with one line instead of letting it fail late or silently.

- :func:`check_fits`: a model or batch that cannot fit in this rank's memory (a config typo such
  as ``model.n_layer: 20000``) is refused naming the keys, before anything is allocated.
- :func:`check_resumed_hyperparameters`: a config that changes an optimizer hyperparameter of
  the run it resumes is refused naming the key (the loaded checkpoint's value would win silently).
- :class:`NonfiniteSteps`: a step whose gradients hold inf/NaN changes no parameter -- the job
  skips it when the global gradient norm is not finite, and otherwise (gradient release,
  DeepSpeed) the dist8 optimizer skips the blocks concerned. Loss stays finite, so without a
  count a run whose gradients are always NaN would train nothing to the end and look healthy.
  Each such step is counted and announced; more than ``train.max_nonfinite_steps`` in a row
  stop the run (:class:`TrainingDiverged`).
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable

import torch

from dist8.train.config import Config, ConfigError, TrainingDiverged, torch_dtype
from dist8.train.model import GPTConfig

__all__ = ["NonfiniteSteps", "check_fits", "check_resumed_hyperparameters", "memory_of"]


def memory_of(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's total, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def check_fits(cfg: Config, model: GPTConfig, device: torch.device, world: int) -> None:
    """Refuse, naming the keys, a model whose parameters or a batch whose logits alone exceed ``device``'s memory.

    Both are lower bounds of what a step needs (activations, gradients and optimizer state come on
    top), so nothing that could fit is refused. Parameters are counted as this rank's share
    (``1/world``: FSDP2 and ZeRO-3 shard them).
    """
    available = memory_of(device)
    where = "this machine" if device.type == "cpu" else f"{device}"
    element = torch.empty((), dtype=torch_dtype(cfg.model.dtype)).element_size()
    params = model.num_params()
    need = params * element / world
    if need > available:
        keys = f"model.n_layer={cfg.model.n_layer}, model.d_model={cfg.model.d_model}"
        if cfg.model.seq_len * cfg.model.d_model > params / 2:  # the position embedding is most of the model
            keys = f"model.seq_len={cfg.model.seq_len}, {keys}"
        raise ConfigError(f"config keys {keys}: the "
                          f"model's {params:,} parameters alone need {_gib(need)} per rank ({cfg.model.dtype}, "
                          f"{world} rank(s)), more than the {_gib(available)} of {where}")
    logits = cfg.train.batch_size * cfg.model.seq_len * model.vocab_size * 4
    if logits > available:
        raise ConfigError(f"config keys train.batch_size={cfg.train.batch_size}, model.seq_len={cfg.model.seq_len}: "
                          f"one batch's logits alone need {_gib(logits)}, more than the {_gib(available)} of {where}")


def _same(a: Any, b: Any) -> bool:
    """Whether a param group's value ``a`` is the config's ``b``: lists and tuples alike, a one-element
    tensor as its number, but True is not 1 and "1" is not 1."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        if a.numel() != 1:
            return False
        a = a.item()
    if isinstance(a, (str, bool)) or isinstance(b, (str, bool)):
        return type(a) is type(b) and a == b
    return a == b


def check_resumed_hyperparameters(cfg: Config, optimizer: Any, path: str) -> None:
    """Refuse, naming the key, a config whose ``optimizer.args`` differ from the checkpoint's just loaded.

    Loading a state dict gives the param groups the checkpoint's hyperparameters (torch's rule), so
    a value changed in the config for the resumed run would be silently ignored.
    """
    for key, wanted in cfg.optimizer.args.items():
        for group in getattr(optimizer, "param_groups", []):
            if key in group and not _same(group[key], wanted):
                raise ConfigError(f"config key optimizer.args.{key} is {wanted!r} but {path} was saved with "
                                  f"{_plain(group[key])!r}, which loading it restores; resume with the checkpoint's "
                                  "value, or start a new run (another checkpoint.dir)")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value


class NonfiniteSteps:
    """Counts steps whose gradients held inf/NaN and stops the run after too many in a row.

    Every rank must decide alike, so the trainer all-reduces each step's local :meth:`flag`
    with the loss and passes the sum to :meth:`update`.

    Args:
        limit: most consecutive such steps tolerated (``train.max_nonfinite_steps``); one more
            raises :class:`TrainingDiverged`. 0 stops at the first.
        skip_count: reads the dist8 optimizer's cumulative count of skipped blocks
            (``nonfinite_skips``), or None for an optimizer without one (torch's).
    """

    def __init__(self, limit: int, skip_count: Callable[[], int] | None) -> None:
        self.limit = limit
        self.skip_count = skip_count
        self.in_a_row = 0
        self.window = 0  # such steps since the last metrics record
        self._skips_before = 0

    def begin_step(self) -> None:
        self._skips_before = self.skip_count() if self.skip_count is not None else 0

    def flag(self, grad_norm: float | None) -> float:
        """1.0 when this rank saw inf/NaN this step: a non-finite gradient norm, or blocks the optimizer skipped."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            return 1.0
        return float(self.skip_count is not None and self.skip_count() > self._skips_before)

    def update(self, any_rank: bool, step: int, say: Callable[[str], None], skipped_step: bool) -> None:
        """Record step ``step`` (``any_rank``: some rank flagged it); raise after more than ``limit`` in a row."""
        if not any_rank:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.window += 1
        if self.in_a_row > self.limit:
            raise TrainingDiverged(
                f"gradients held inf/NaN in {self.in_a_row} consecutive steps (the last at step {step}), more than "
                f"train.max_nonfinite_steps={self.limit}; stopping (lower train.lr? check the data and the model)")
        if self.in_a_row == 1:
            what = "the step was skipped" if skipped_step else "the optimizer skipped the blocks concerned"
            say(f"step {step}: gradients hold inf/NaN, {what}; {self.limit} such steps in a row are tolerated "
                "(train.max_nonfinite_steps)")

    def take_window(self) -> int:
        """Such steps since the last call (one metrics record's ``nonfinite_steps``)."""
        n, self.window = self.window, 0
        return n
