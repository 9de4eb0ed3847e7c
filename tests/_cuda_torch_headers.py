"""Headers of a CUDA build of torch, for compiling the CUDA kernels on a machine without one.

The CPU wheel the tests run on lacks ``c10/cuda``, so ``dist8_cuda.cu`` compiled
against it takes its fallback branch (legacy stream, hand-written device guard).
A GPU machine compiles the other branch (torch's current stream, CUDAGuard and
launch check); this module fetches that branch's headers so CI compiles it too:
the ``torch/include`` tree of a CUDA torch wheel, taken with ``pip download``
(on this project's machines the wheel lies on the local disk) and unpacked once
into a cache folder (``DIST8_TEST_CACHE``, default ``~/.cache/dist8-tests``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# The newest CUDA build of torch this project's machines carry on disk (pip's cap there is 2.14.1).
CUDA_TORCH_VERSION = "2.14.1"
_MARKER = "c10/cuda/impl/cuda_cmake_macros.h"


def cache_root() -> Path:
    return Path(os.environ.get("DIST8_TEST_CACHE") or Path.home() / ".cache" / "dist8-tests")


def cuda_torch_include_root() -> tuple[Path | None, str]:
    """(``.../torch/include`` of a CUDA torch, "") or (None, why not)."""
    from torch.utils import cpp_extension

    for path in cpp_extension.include_paths():  # the installed torch is a CUDA build
        if (Path(path) / _MARKER).is_file():
            return Path(path), ""
    target = cache_root() / f"torch-{CUDA_TORCH_VERSION}-include"
    include = target / "torch" / "include"
    if (include / _MARKER).is_file():
        return include, ""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
               f"torch=={CUDA_TORCH_VERSION}", "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = list(Path(tmp).glob("torch-*.whl"))
        if result.returncode != 0 or not wheels:
            return None, f"`{' '.join(cmd[2:])}` failed: {result.stderr.strip()[-500:]}"
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [n for n in wheel.namelist() if n.startswith("torch/include/")]
            wheel.extractall(partial, members)
    if not (partial / "torch" / "include" / _MARKER).is_file():
        return None, f"torch=={CUDA_TORCH_VERSION} from pip is not a CUDA build (no {_MARKER})"
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return include, ""
