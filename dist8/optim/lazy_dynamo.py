"""``torch.optim.Optimizer`` whose own dynamo-disabled methods leave ``torch._dynamo`` unimported.

torch wraps ``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and
``load_state_dict`` in ``torch._disable_dynamo``, which imports ``torch._dynamo`` at their
first call: constructing any optimizer costs every process about 1 s of start-up on a 2-core
CPU (sympy and inductor's config), for each rank of a launch that never compiles. dist8's
optimizers (and :class:`dist8.shard.ShardedOptimizer`) derive from this class, whose methods
are torch's, called through :func:`dist8.kernels.eager.call_torch_eager`: with dynamo
imported they are torch's dynamo-disabled ones, before it the functions they wrap.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from dist8.kernels.eager import call_torch_eager

__all__ = ["LazyDynamoOptimizer"]

_Optimizer = torch.optim.Optimizer


class LazyDynamoOptimizer(_Optimizer):
    """``torch.optim.Optimizer`` with the four methods above calling torch's through
    :func:`~dist8.kernels.eager.call_torch_eager` (same behaviour, no dynamo import)."""

    @functools.wraps(_Optimizer.add_param_group)
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        call_torch_eager(_Optimizer.add_param_group, self, param_group)

    @functools.wraps(_Optimizer.zero_grad)
    def zero_grad(self, set_to_none: bool = True) -> None:
        call_torch_eager(_Optimizer.zero_grad, self, set_to_none)

    @functools.wraps(_Optimizer.state_dict)
    def state_dict(self) -> dict[str, Any]:
        return call_torch_eager(_Optimizer.state_dict, self)

    @functools.wraps(_Optimizer.load_state_dict)
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        call_torch_eager(_Optimizer.load_state_dict, self, state_dict)
