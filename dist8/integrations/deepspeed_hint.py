"""A clear error for a DeepSpeed config naming a dist8 optimizer before dist8's hook is installed.

DeepSpeed alone stops such a config deep inside ``deepspeed.initialize`` with
``AssertionError: dist8.AdamW8bit is not a supported DeepSpeed Optimizer``. ``import dist8``
arms this hint without importing DeepSpeed: when ``deepspeed.runtime.engine`` is (or gets)
imported, ``DeepSpeedEngine._is_supported_optimizer`` answers a ``dist8.*`` type with a
``ValueError`` saying what to do (``import dist8.integrations.deepspeed``, which installs
the hook, or ``dist8.integrations.deepspeed.install()``). Once the hook is installed it
handles ``dist8.*`` types before the hint is reached; other types go to DeepSpeed untouched.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType


__all__ = ["arm", "arm_engine", "MESSAGE"]

ENGINE_MODULE = "deepspeed.runtime.engine"
MESSAGE = (
    "DeepSpeed config optimizer type {name!r} is a dist8 optimizer, but dist8's DeepSpeed hook is not installed: "
    "add `import dist8.integrations.deepspeed` (it installs the hook) before deepspeed.initialize / the HF Trainer, "
    "or call dist8.integrations.deepspeed.install()"
)


def arm_engine(engine_module: ModuleType) -> None:
    """Wrap ``DeepSpeedEngine._is_supported_optimizer`` of the imported engine module (idempotent)."""
    engine = engine_module.DeepSpeedEngine
    original = engine._is_supported_optimizer
    if getattr(original, "dist8_hint", False):
        return

    def _is_supported_optimizer(self, optimizer_name):
        # imported here: arming runs at `import dist8`, which must not import torch
        from dist8.integrations.deepspeed_config import is_dist8_type

        if is_dist8_type(optimizer_name):
            raise ValueError(MESSAGE.format(name=optimizer_name))
        return original(self, optimizer_name)

    _is_supported_optimizer.dist8_hint = True
    _is_supported_optimizer.__wrapped__ = original
    engine._is_supported_optimizer = _is_supported_optimizer


class _ArmOnImport(importlib.abc.MetaPathFinder):
    """Arms the engine module right after it is first imported (one shot, then leaves sys.meta_path)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != ENGINE_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_arm(module: ModuleType) -> None:
            exec_module(module)
            try:
                arm_engine(module)
            except AttributeError:  # a DeepSpeed without DeepSpeedEngine: nothing to hint at
                pass

        spec.loader.exec_module = exec_and_arm
        return spec


def arm() -> None:
    """Arm the hint now if DeepSpeed's engine is imported, else when it is (never imports DeepSpeed)."""
    engine_module = sys.modules.get(ENGINE_MODULE)
    if engine_module is not None:
        try:
            arm_engine(engine_module)
        except AttributeError:
            pass
        return
    if not any(isinstance(f, _ArmOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _ArmOnImport())
