"""Fixtures shared by the test modules.

The kernel backends under test (tests/test_kernels.py, tests/test_kernels_master.py): a test
parametrized with ``kernel_cases.per_backend`` gets ``backend_id`` ("cpu", "cuda-block",
"cuda-warp", "emulated-block", "emulated-warp"); ``backend`` loads that backend, ``kind`` is
"cpu", "cuda" or "emulated" and ``device`` is where the backend's tensors live.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def kind(backend_id: str) -> str:
    """"cpu", "cuda" or "emulated"."""
    return backend_id.split("-")[0]


@pytest.fixture
def device(kind: str) -> str:
    """Where the backend's tensors live (the emulated CUDA kernels run on CPU tensors)."""
    return "cuda" if kind == "cuda" else "cpu"


@pytest.fixture
def backend(backend_id: str, kind: str, monkeypatch):
    """The backend under test; the CUDA variants (block / warp kernel) are picked per call by DIST8_CUDA_KERNEL."""
    from dist8.kernels import native

    if kind == "cpu":
        return native.load_backend("cpu")
    monkeypatch.setenv("DIST8_CUDA_KERNEL", backend_id.split("-")[1])
    if kind == "cuda":
        return native.load_backend("cuda")
    from _cuda_emulation import emulated_cuda_backend

    return emulated_cuda_backend()
