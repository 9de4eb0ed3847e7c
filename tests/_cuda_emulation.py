"""The CUDA kernels run on the CPU through tests/cuda_emu (fibers for threads), as a backend.

``emulated_cuda_backend()`` builds ``csrc/cuda/dist8_cuda.cu`` as C++ with
``DIST8_CUDA_EMULATION`` (torch.utils.cpp_extension, cached like the real kernels), registers
its ops under ``torch.ops.dist8_cuda_emu`` with dist8's schemas and returns a
:class:`dist8.kernels.native.NativeBackend` that calls them on CPU tensors. Slow (every CUDA
thread is a fiber): for small cases that check the kernels' logic without a GPU.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from dist8.kernels import native

HERE = Path(__file__).resolve().parent
_LIB = None


@functools.lru_cache(maxsize=1)
def emulated_cuda_backend() -> native.NativeBackend:
    global _LIB
    from torch.utils import cpp_extension

    _LIB = torch.library.Library("dist8_cuda_emu", "DEF")  # noqa: TOR901 - implemented in C++
    for schema in native._SCHEMAS.values():
        _LIB.define(schema)
    src = native.csrc_dir()
    cpp_extension.load(
        name="dist8_cuda_emu",
        sources=[str(HERE / "cuda_emu" / "dist8_cuda_emu.cpp")],
        extra_include_paths=[str(src / "include"), str(HERE / "cuda_emu")],
        extra_cflags=["-O1", "-ffp-contract=off"],
        build_directory=native._build_dir("dist8_cuda_emu"),  # DIST8_BUILD_DIR, as for the real kernels
        is_python_module=False,
        with_cuda=False,
    )
    backend = native.NativeBackend("cpu")
    backend.name = "cuda-emulated"
    backend._ops = torch.ops.dist8_cuda_emu
    return backend
