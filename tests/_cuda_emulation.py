"""The CUDA kernels run on the CPU through tests/cuda_emu (fibers for threads), as a backend.

``emulated_cuda_backend()`` builds ``csrc/cuda/dist8_cuda.cu`` as C++ with
``DIST8_CUDA_EMULATION`` (dist8.kernels.build, keyed by its sources like the real kernels), registers
its ops under ``torch.ops.dist8_cuda_emu`` with dist8's schemas and returns a
:class:`dist8.kernels.native.NativeBackend` that calls them on CPU tensors. Slow (every CUDA
thread is a fiber): for small cases that check the kernels' logic without a GPU.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from dist8.kernels import build, native

HERE = Path(__file__).resolve().parent
_LIB = None


@functools.lru_cache(maxsize=1)
def emulated_cuda_backend() -> native.NativeBackend:
    global _LIB
    _LIB = torch.library.Library("dist8_cuda_emu", "DEF")  # noqa: TOR901 - implemented in C++
    for schema in native.OP_SCHEMAS.values():
        _LIB.define(schema)
    src = build.csrc_dir()
    includes = [src / "include", src / "cuda", HERE / "cuda_emu"]
    flags = ["-O1", "-ffp-contract=off"]
    files = [p for d in includes for p in d.iterdir() if p.is_file()]
    build.jit_load(build.content_name("dist8_cuda_emu", files, flags), [HERE / "cuda_emu" / "dist8_cuda_emu.cpp"],
                   includes, extra_cflags=flags, with_cuda=False)
    return native.NativeBackend("cpu", ops=torch.ops.dist8_cuda_emu, name="cuda-emulated")
