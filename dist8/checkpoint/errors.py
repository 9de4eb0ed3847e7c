"""The one exception of dist8.checkpoint."""
from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, hostile or does not fit the model/optimizer.

    The message is one line naming the file, parameter or metadata key.
    """
