"""dist8's version and the oldest torch it supports, in a module of its own so any layer can read
them without importing the package face (or torch)."""
from __future__ import annotations

import re

__all__ = ["__version__", "MIN_TORCH", "check_torch_version", "major_minor"]

__version__ = "0.1.0"

# The oldest torch the whole test suite has passed on (README, "Which torch"); pyproject.toml's
# dependency says the same (tests/test_packaging.py holds them equal). FSDP2 on CPU ranks needs
# 2.9: torch 2.6's fully_shard all-gather calls Stream.record_event, which CPU streams lack, and
# 2.7/2.8 sum the ranks' gradients instead of averaging them.
MIN_TORCH = (2, 6)


def major_minor(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string (``"2.8.0a0+git..."`` -> ``(2, 8)``), None if it has none."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_torch_version(version: str) -> None:
    """ImportError naming both versions when torch ``version`` (``torch.__version__``) is older than
    :data:`MIN_TORCH`; development and local builds (``2.8.0a0+git...``, ``2.13.0+cpu``) compare by
    their major.minor."""
    have = major_minor(version)
    if have is None:
        return  # an unversioned source build: nothing to compare
    if have < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(f"dist8 needs torch >= {need}, found torch {version} "
                          f"(pip install 'torch>={need}'; the README's 'Which torch' says what was tested)")
