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

__all__ = ["check_dcp_metadata", "load_torch_file", "weights_only_loads"]

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


_DCP_MODULES = ("torch.distributed.checkpoint.metadata",)
# DCP pickles the checkpoint's path: pathlib's classes live in pathlib._local from Python 3.13 on
# (pickles name that module there), in pathlib before.
_DCP_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
                ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
                ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles only DCP's metadata classes, torch dtypes/Size and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module in _DCP_MODULES or (module, name) in _DCP_GLOBALS or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def check_dcp_metadata(path: str | os.PathLike) -> None:
    """Refuse a torch.distributed.checkpoint ``.metadata`` file that would unpickle anything but DCP metadata.

    DCP reads ``.metadata`` with plain ``pickle.load``; this check runs it through an allowlist
    first (DCP's metadata dataclasses, torch dtypes and ``Size``, containers), so a crafted file
    is refused, naming the global, before DCP opens it.
    """
    try:
        with open_regular(path) as f:
            _DcpMetadataUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crafted or corrupt pickle fails in many ways
        raise CheckpointError(f"{path} is not plain DCP metadata (nothing was run): "
                              f"{' '.join(str(exc).split())[:200]}") from None
