"""Reading ``torch.save`` files without unpickling code: ``weights_only=True`` always.

``torch.load(weights_only=True)`` rebuilds only tensors, containers and primitive
values, plus the classes passed as ``allowed`` (e.g. the few DeepSpeed enums and
dataclasses found in its checkpoints); any other global in the pickle is refused
before anything runs. :func:`weights_only_loads` forces the same for third-party
code called inside it (DeepSpeed's ``zero_to_fp32`` calls ``torch.load(weights_only=False)``).
A torch.distributed.checkpoint directory's pickled ``.metadata`` is read through an allowlist
and checked (:func:`read_dcp_metadata`), and DCP is handed that checked metadata
(:func:`checked_dcp_reader`) instead of unpickling the file itself.
"""
from __future__ import annotations

import contextlib
import functools
import os
import pickle
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from dist8.checkpoint.errors import CheckpointError
from dist8.checkpoint.files import member, open_regular

__all__ = ["check_dcp_metadata", "checked_dcp_reader", "load_torch_file", "read_dcp_metadata", "weights_only_loads"]

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


_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
# DCP pickles the checkpoint's path: pathlib's classes live in pathlib._local from Python 3.13 on
# (pickles name that module there), in pathlib before.
_DCP_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
                ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),
                ("copyreg", "_reconstructor"), ("copyreg", "__newobj__"),
                ("builtins", "object"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")}


@functools.cache  # imports DCP on first use, not when dist8 is imported
def _dcp_metadata_classes() -> frozenset[tuple[str, str]]:
    """The classes DCP's metadata module defines (its dataclasses and enums), by exact name: not the
    module's other names (it imports ``os`` and ``torch``), and never a dotted name, which pickle
    protocol 4 resolves attribute by attribute (``os.system`` "in" that module)."""
    import torch.distributed.checkpoint.metadata as dcp_metadata

    return frozenset((_DCP_METADATA_MODULE, name) for name, obj in vars(dcp_metadata).items()
                     if isinstance(obj, type) and obj.__module__ == _DCP_METADATA_MODULE)


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Unpickles only DCP's metadata classes, torch dtypes/Size and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _dcp_metadata_classes() or (module, name) in _DCP_GLOBALS or (
                module == "torch" and "." not in name and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def read_dcp_metadata(directory: str | os.PathLike) -> Any:
    """The checked ``Metadata`` of the torch.distributed.checkpoint directory ``directory``.

    DCP reads ``.metadata`` with plain ``pickle.load``; here it is unpickled through an allowlist
    (DCP's metadata classes by exact name, torch dtypes and ``Size``, containers), so a crafted
    file is refused, naming the global, with nothing run. The result must be DCP's ``Metadata``,
    and every data file it points to a plain file name inside ``directory`` that is a regular
    file (no symlink, no FIFO) holding the byte range given for it, with no load transforms
    (dist8 writes none). Any failure: one-line CheckpointError naming the file.
    """
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(directory) / ".metadata"
    try:
        with open_regular(path) as f:
            metadata = _DcpMetadataUnpickler(f).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a crafted or corrupt pickle fails in many ways
        raise CheckpointError(f"{path} is not plain DCP metadata (nothing was run): "
                              f"{' '.join(str(exc).split())[:200]}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not DCP's Metadata with its storage_data")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        where = f"{path}: storage entry {str(index)[:80]}"
        if not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where} is a {type(info).__name__}, not DCP's _StorageInfo")
        if info.transform_descriptors:
            raise CheckpointError(f"{where} asks for load transforms {str(info.transform_descriptors)[:80]}, "
                                  "which dist8 never writes")
        name = info.relative_path
        if name not in sizes:
            sizes[name] = member(directory, name, f"{where}: relative_path").stat().st_size
        offset, length = info.offset, info.length
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length)) or \
                offset + length > sizes[name]:
            raise CheckpointError(f"{where}: bytes [{offset!r}, +{length!r}) are not inside {name} "
                                  f"({sizes[name]} bytes)")
    return metadata


def check_dcp_metadata(path: str | os.PathLike) -> None:
    """Refuse the ``.metadata`` file ``path`` of a DCP directory unless :func:`read_dcp_metadata` accepts it."""
    path = Path(path)
    if path.name != ".metadata":
        raise CheckpointError(f"{path}: DCP metadata is a directory's .metadata file")
    read_dcp_metadata(path.parent)


def checked_dcp_reader(directory: str | os.PathLike) -> Any:
    """A ``FileSystemReader`` of ``directory`` that gives DCP the metadata :func:`read_dcp_metadata` checked.

    Pass it as ``dcp.load(..., storage_reader=...)``: DCP then never unpickles ``.metadata`` itself,
    so a file swapped after the check is not read either. Tensors and byte items still load through
    DCP (``torch.load(weights_only=True)``; run it inside :func:`weights_only_loads` for byte items).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    metadata = read_dcp_metadata(directory)

    class CheckedReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:  # noqa: ARG002 - one metadata file
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return CheckedReader(directory)
