"""torch.distributed.checkpoint's state initialisation, recognised so that it makes state without stepping.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` (and ``get_state_dict`` / ``set_state_dict``)
give an optimizer without state some by running ``_init_optim_state``: zero gradients, every group's
``lr`` set to 0, one real ``optimizer.step()``. For dist8 that step was not a no-op: every parameter's
``step`` counter became 1 (Adam's bias correction, AdEMAMix's warm-ups then ran one step ahead), a zero
went into percentile clipping's gradient-norm history, and a parameter whose override carries its own
``lr`` (``overrides=``, ``GlobalOptimManager``) took a real step, weight decay included. It ran on the
live optimizer when a checkpoint was taken before the first step, and on the optimizer being loaded,
where parameters without saved state kept it. Recognised here, the step creates each parameter's fresh
state -- what its first real step would create -- and changes nothing else.
"""
from __future__ import annotations

import sys

from dist8.kernels.eager import eager_only

__all__ = ["DCP_STATE_DICT_MODULE", "called_by_dcp", "called_by_dcp_init"]

#: The module of torch's ``get/set_optimizer_state_dict``; it calls the optimizer's methods directly.
DCP_STATE_DICT_MODULE = "torch.distributed.checkpoint.state_dict"


def _dcp_frame(depth: int, function: str | None, frames: int) -> bool:
    frame = sys._getframe(depth)
    for _ in range(frames):  # decorators and wrappers of step (torch's, an LR scheduler's, accelerate's)
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == DCP_STATE_DICT_MODULE and (
                function is None or frame.f_code.co_name == function):
            return True
        frame = frame.f_back
    return False


def called_by_dcp() -> bool:
    """Whether a method (the caller of this function) was called by torch's ``get/set_optimizer_state_dict``."""
    return _dcp_frame(2, None, 4)


@eager_only  # a step traced by torch.compile graph-breaks here (dynamo cannot trace frame walks)
def called_by_dcp_init() -> bool:
    """Whether a ``step()`` (the caller of this function) is torch DCP's ``_init_optim_state``."""
    return _dcp_frame(2, "_init_optim_state", 12)
