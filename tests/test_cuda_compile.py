"""Compile-only check of the CUDA kernels (no GPU needed): nvcc -c against the installed torch's
headers for sm_80, and (tests/test_cuda_compile_cuda_torch.py) against a CUDA build's headers for
sm_90. One architecture per compile: each is minutes of a 2-core machine (cudafe++, cicc, ptxas and
the host compile measured 69 + 96 + 49 + 61 s for sm_90 at load average 5), and the two files run on
different pytest-xdist workers; both architectures are still built in every run.

A successful compile is remembered under ``DIST8_TEST_CACHE`` (default ``~/.cache/dist8-tests``)
by a hash of everything it depends on (the CUDA sources and the headers they include, the nvcc
command line without the checkout's path, ``nvcc --version``, the torch headers' version): an
unchanged input is not recompiled on every test run or clone (two nvcc compiles of both archs
are minutes on a busy 2-core machine); any change to them compiles again.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from _cuda_torch_headers import cache_root

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "cuda" / "dist8_cuda.cu"


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = Path(candidate) / "bin" / "nvcc"
        if candidate and path.is_file():
            return str(path)
    return None


def compile_kernels(tmp_path, includes: list[str], std: str, arch: int) -> None:
    """nvcc -c the kernels for ``sm_<arch>`` with torch's extension flags; assert the arch is in."""
    nvcc = find_nvcc()
    if nvcc is None:
        print("SKIP reason: nvcc not found on PATH, in $CUDA_HOME or /usr/local/cuda")
        pytest.skip("nvcc not found (compile-only CUDA test)")
    from dist8.kernels.build import cuda_nvcc_flags

    includes = [f"-I{p}" for p in includes]
    includes += [f"-I{ROOT / 'csrc' / 'include'}", f"-I{sysconfig.get_paths()['include']}"]
    obj = tmp_path / "dist8_cuda.o"
    cmd = [
        nvcc, "-c", str(SOURCE), "-o", str(obj), f"-std={std}", *cuda_nvcc_flags(), "-Xcompiler", "-fPIC",
        "-gencode", f"arch=compute_{arch},code=sm_{arch}",
        "-diag-suppress", "3306", *includes,
    ]
    marker = _compiled_marker(nvcc, cmd, obj)
    if marker.is_file():
        return  # these exact inputs compiled before
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=840)
    assert result.returncode == 0, f"nvcc failed:\n{' '.join(cmd)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert obj.is_file() and obj.stat().st_size > 0
    # the architecture made it into the fat binary
    cuobjdump = shutil.which("cuobjdump") or str(Path(nvcc).with_name("cuobjdump"))
    if Path(cuobjdump).is_file():
        listing = subprocess.run([cuobjdump, "--list-elf", str(obj)], capture_output=True, text=True)
        if listing.returncode == 0:
            assert f"sm_{arch}" in listing.stdout, listing.stdout
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(" ".join(cmd))


def _compiled_marker(nvcc: str, cmd: list[str], obj: Path) -> Path:
    """The cache file that says this compile (sources, headers, command, nvcc, torch headers) succeeded.

    Keyed by contents, not by where the checkout is: the CUDA sources and headers it includes
    (csrc/include, csrc/cuda), the command with this checkout's path taken out, nvcc's version and
    the torch headers' version, so a fresh clone of unchanged sources does not compile again.
    """
    h = hashlib.sha256()
    for path in sorted(p for d in ("include", "cuda") for p in (ROOT / "csrc" / d).rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join(c.replace(str(ROOT), "<checkout>") for c in cmd if c != str(obj)).encode())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
    h.update(version.stdout.encode())
    for flag in cmd:  # the torch headers the command includes: their version file
        header = Path(flag[2:]) / "torch" / "version.h" if flag.startswith("-I") else None
        if header is not None and header.is_file():
            h.update(header.read_bytes())
    return cache_root() / "nvcc-compiled" / h.hexdigest()[:24]


@pytest.mark.timeout(900)
def test_cuda_kernels_compile(tmp_path):
    """Against the installed torch (here a CPU build: the fallback stream/guard branch), sm_80."""
    from torch.utils import cpp_extension

    compile_kernels(tmp_path, cpp_extension.include_paths(), "c++17", 80)
