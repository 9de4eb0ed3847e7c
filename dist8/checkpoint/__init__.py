"""World-size-independent checkpoints of dist8 optimizer state (codes + absmax, safetensors, no pickle)."""
from dist8.checkpoint.format import CheckpointError, read_metadata, verify_files
from dist8.checkpoint.io import checkpoints, latest, load, save

__all__ = ["CheckpointError", "checkpoints", "latest", "load", "read_metadata", "save", "verify_files"]
