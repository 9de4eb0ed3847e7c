"""Slow (``pytest -m slow``, ~2-4 min on 2 cores): the fp8 codec of the CPU kernels against the
exact nearest code for all 2^32 float32 inputs, both maps, scalar and AVX2 paths."""
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_fp8_codec_equals_nearest_code_for_every_float(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the CPU kernels need one too)"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    arch = ["-mavx2", "-mfma"] if " avx2" in flags else []
    exe = tmp_path / "fp8_exhaustive"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-pthread", *arch,
                    f"-I{ROOT / 'csrc' / 'cpu'}", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "fp8_exhaustive.cpp"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=3600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("mismatches 0, avx2 mismatches 0") == 2 or not arch, out.stdout
