"""Choosing a kernel backend per device: native (C++ on CPU, CUDA on GPU) or reference.

``DIST8_BACKEND=reference|cpu|cuda`` forces one. A native backend that fails to
build falls back to the reference with a one-line warning; ``dist8 info`` shows
why. A DIST8_* switch with a value it does not take is an error, not a failed build.
"""
from __future__ import annotations

import os
import warnings

import torch

from dist8.env import CHOICES, EnvironmentSettingError, env_choice
from dist8.kernels import build
from dist8.kernels.eager import eager_only
from dist8.kernels.reference import ReferenceBackend

__all__ = ["get_backend", "backend_report", "BACKEND_NAMES"]

BACKEND_NAMES = CHOICES["DIST8_BACKEND"]  # one list: dist8.env reads the variable
_reference = ReferenceBackend()
_native: dict[str, object] = {}
_errors: dict[str, str] = {}


def _forced() -> str | None:
    return env_choice("DIST8_BACKEND")


def _load_native(kind: str):
    if kind in _native:
        return _native[kind]
    if kind in _errors:
        return None
    try:
        from dist8.kernels import native

        backend = native.load_backend(kind)
    except EnvironmentSettingError:  # a typo in a DIST8_* switch is the user's to fix, not a build failure
        raise
    except Exception as exc:  # noqa: BLE001 - any build/import failure means: use the reference
        _errors[kind] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        warnings.warn(f"dist8: {kind} kernels unavailable ({_errors[kind]}); using the reference backend", stacklevel=3)
        return None
    _native[kind] = backend
    return backend


@eager_only  # host-side choice (and first-use build), never part of a traced graph
def get_backend(device: torch.device | str):
    """The backend that updates tensors on ``device``."""
    if not isinstance(device, torch.device):  # called once per parameter per step: skip the constructor
        device = torch.device(device)
    forced = _forced()
    if forced == "reference":
        return _reference
    kind = "cuda" if device.type == "cuda" else "cpu" if device.type == "cpu" else None
    if kind is None:
        return _reference
    if forced is not None and forced != kind:
        raise RuntimeError(f"DIST8_BACKEND={forced} cannot update tensors on {device}")
    backend = _load_native(kind)
    if backend is None:
        if forced is not None:
            raise RuntimeError(f"DIST8_BACKEND={forced} but the {kind} kernels failed: {_errors[kind]}")
        return _reference
    return backend


def backend_report() -> dict[str, dict[str, str]]:
    """For each device kind: the backend in use and why (used by ``dist8 info``)."""
    report: dict[str, dict[str, str]] = {}
    forced = _forced()
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in kinds:
        if forced == "reference":
            report[kind] = {"backend": "reference", "why": "DIST8_BACKEND=reference"}
            continue
        backend = _load_native(kind)
        if backend is None:
            report[kind] = {"backend": "reference", "why": f"{kind} kernels failed: {_errors.get(kind, '?')}"}
        else:
            why = "native kernels built and loaded"
            if not (kind == "cuda" and os.environ.get("DIST8_CUDA_PREBUILT")):
                why += f" from {build.build_directory(kind)}"
            if kind == "cpu":
                try:
                    why += f": {torch.ops.dist8_cpu_info.features()}"
                except (AttributeError, RuntimeError):  # a build from before the features op
                    pass
            report[kind] = {"backend": backend.name, "why": why}
    if not torch.cuda.is_available():
        report["cuda"] = {"backend": "-", "why": "no CUDA device visible to torch"}
    return report
