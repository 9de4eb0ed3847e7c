"""Reading ``torch.save`` files without unpickling code: ``weights_only=True`` always.

``torch.load(weights_only=True)`` rebuilds only tensors, containers and primitive
values, plus the classes passed as ``allowed`` (e.g. the few DeepSpeed enums and
dataclasses found in its checkpoints); any other global in the pickle is refused
before anything runs. :func:`weights_only_loads` forces the same for third-party
code called inside it (DeepSpeed's ``zero_to_fp32`` calls ``torch.load(weights_only=False)``).
"""
from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.files import open_regular

__all__ = ["load_torch_file", "weights_only_loads"]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextlib.contextmanager
def weights_only_loads(allowed: Iterable[Any] = ()) -> Iterator[None]:
    """Inside: every ``torch.load`` is ``weights_only=True`` with ``allowed`` globals, whatever its caller asked."""
    previous = os.environ.get(_FORCE)
    no_force = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    finally:
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous
        if no_force is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = no_force


def load_torch_file(path: str | os.PathLike, allowed: Iterable[Any] = (), map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` of a regular file; CheckpointError naming it on any failure.

    A pickle that needs a global outside torch's weights-only set and ``allowed`` is
    refused without running it (the message names the global).
    """
    try:
        with open_regular(path) as f, weights_only_loads(allowed):
            return torch.load(f, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError, TypeError, KeyError,
            AttributeError, IndexError) as exc:
        first = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line or "global" in line),
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise CheckpointError(f"{path} cannot be loaded without unpickling code (weights_only=True): "
                              f"{first[:200]}") from None
