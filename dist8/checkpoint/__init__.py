"""World-size-independent checkpoints of dist8 optimizer state (codes + absmax, safetensors, no pickle)."""
from dist8.checkpoint.format import CheckpointError, read_metadata, verify_files
from dist8.checkpoint.from_torch import from_torch_optim
from dist8.checkpoint.io import checkpoints, latest, load, save
from dist8.checkpoint.weights import load_fp32_weights

__all__ = ["CheckpointError", "checkpoints", "from_torch_optim", "latest", "load", "load_fp32_weights", "read_metadata",
           "save", "verify_files"]
