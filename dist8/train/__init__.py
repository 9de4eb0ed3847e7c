"""dist8's reference training job: a small byte-level GPT on the CPython stdlib, driven by YAML configs.

Entry points: ``dist8 train --config configs/tiny-gpt.yaml`` or
``torchrun --nproc_per_node=N -m dist8.train --config ...``; in Python,
:func:`dist8.train.config.load_config` and :func:`dist8.train.trainer.run`.
"""
from dist8.train.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config"]
