"""Slow (``pytest -m slow``, ~2-4 min per vector path on 2 cores): the fp8 codec of the CPU kernels
against the exact nearest code for all 2^32 float32 inputs, both maps, scalar and each vector path
this CPU runs (AVX2; AVX-512 where present)."""
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def cpu_flags() -> set[str]:
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return set()
    for line in info.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vector_paths() -> list[tuple[str, list[str]]]:
    flags = cpu_flags()
    paths = []
    if {"avx2", "fma"} <= flags:
        paths.append(("avx2", ["-mavx2", "-mfma"]))
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        paths.append(("avx512", ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512vl"]))
    return paths or [("none", [])]


@pytest.mark.parametrize("path,arch", vector_paths(), ids=[p for p, _ in vector_paths()])
def test_fp8_codec_equals_nearest_code_for_every_float(tmp_path, path, arch):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the CPU kernels need one too)"
    exe = tmp_path / "fp8_exhaustive"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-pthread", *arch,
                    f"-I{ROOT / 'csrc' / 'cpu'}", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "fp8_exhaustive.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=3600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    if path != "none":
        want = f"mismatches 0, {path} mismatches 0, {path} value mismatches 0"
        assert out.stdout.count(want) == 2, out.stdout
