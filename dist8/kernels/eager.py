"""Keeping host-side functions out of torch.compile graphs without importing torch._dynamo.

``torch.compiler.disable`` imports ``torch._dynamo`` (with sympy and inductor's config: about
1 s of every process's start-up on a 2-core CPU, paid by each rank of a launch that never
compiles). A compile can only be running once something has imported ``torch._dynamo``, so
:func:`eager_only` applies ``torch.compiler.disable`` at the first call that finds it
imported; until then it calls the function directly. :func:`call_torch_eager` does the same
for torch's own functions that torch wraps in its lazy ``_disable_dynamo`` (``Optimizer``'s
``add_param_group``, ``zero_grad``, ``state_dict``, ``load_state_dict``): their first call
imports dynamo, in every rank of a launch, for every optimizer.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, TypeVar

import torch

__all__ = ["call_torch_eager", "eager_only"]

F = TypeVar("F", bound=Callable)


def eager_only(fn: F) -> F:
    """``torch.compiler.disable(fn)``, made at the first call after ``torch._dynamo`` is imported.

    Under a compile the first call graph-breaks at the ``disable`` itself (torch runs it
    eagerly) and every later trace skips ``fn`` as a disabled function, as the decorator would.
    """
    disabled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        # a closure cell, not a list: dynamo before torch 2.13 graph-breaks with a UserWarning at
        # list.append while tracing the first call
        nonlocal disabled
        if disabled is not None:
            return disabled(*args, **kwargs)
        if "torch._dynamo" not in sys.modules:  # nothing can be compiling
            return fn(*args, **kwargs)
        disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def call_torch_eager(method: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call ``method``, a torch function wrapped in torch's ``_disable_dynamo``, without that
    wrapper's import of ``torch._dynamo`` while nothing has imported it.

    With dynamo imported (a compile may be running) the wrapped function is called, as torch
    would; before, the function it wraps (``functools.wraps``' ``__wrapped__``; ``method``
    itself where a torch version has none).
    """
    if "torch._dynamo" in sys.modules:
        return method(*args, **kwargs)
    return getattr(method, "__wrapped__", method)(*args, **kwargs)
