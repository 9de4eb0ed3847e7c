"""The kernels' master-weight encode/decode (dist8_rules.h) over float32 masters, compiled from the kernel
header itself: the error bound u/2 (u where the correction saturates), exactness for values the
parameter dtype represents, the 16-bit correction never worse than the 8-bit one, sign and finiteness,
for bf16 and fp16 parameters (FlashOptim checks its error-correction code over every mantissa of every
exponent, test/test_ecc_invariants.py). The default run checks every 65537th bit pattern (about 100k
values); ``pytest -m slow`` every finite one (4.3e9 for bf16, 2.4e9 for fp16; ~2.5 min on 2 cores)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exe(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the CPU kernels need one too)"
    out = tmp_path_factory.mktemp("master") / "master_exhaustive"
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-pthread", f"-I{ROOT / 'csrc' / 'include'}",
                    str(ROOT / "tests" / "master_exhaustive.cpp"), "-o", str(out)], check=True)
    return out


def _run(exe, stride):
    out = subprocess.run([str(exe), str(stride)], capture_output=True, text=True, timeout=3600)
    print(out.stdout)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["bf16", "fp16"], out.stdout
    for line in lines:
        assert line.endswith("bound 0, exact 0, wider 0, sign 0, finite 0"), line
        assert int(line.split("values ")[1].split(",")[0]) > 4_000_000_000 // stride // 2, line
    return lines


def test_master_encoding_invariants_sampled(exe):
    _run(exe, 65537)


@pytest.mark.slow
def test_master_encoding_invariants_for_every_float(exe):
    lines = _run(exe, 1)
    assert "values 4278059010" in lines[0] and "values 2399125506" in lines[1]  # every finite value in range
