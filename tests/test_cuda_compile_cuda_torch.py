"""Compile-only check of the CUDA kernels against a CUDA build of torch's headers (sm_90); see
tests/test_cuda_compile.py (a file of its own so that pytest-xdist runs the two compiles side by side)."""
from __future__ import annotations

import pytest

from _cuda_torch_headers import cuda_torch_include_root
from test_cuda_compile import find_nvcc, compile_kernels


@pytest.mark.timeout(900)
def test_cuda_kernels_compile_with_cuda_torch(tmp_path):
    """Against a CUDA build's headers: the branch a GPU machine builds (torch's stream, guard, launch check), sm_90."""
    if find_nvcc() is None:
        print("SKIP reason: nvcc not found on PATH, in $CUDA_HOME or /usr/local/cuda")
        pytest.skip("nvcc not found (compile-only CUDA test)")
    root, why = cuda_torch_include_root()
    if root is None:
        print(f"SKIP reason: no CUDA torch headers: {why}")
        pytest.skip(f"no CUDA torch headers: {why}")
    aten = (root / "ATen" / "ATen.h").read_text()
    std = "c++20" if "C++20 or later" in aten else "c++17"
    compile_kernels(tmp_path, [str(root), str(root / "torch" / "csrc" / "api" / "include")], std, 90)
