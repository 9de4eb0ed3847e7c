"""The other CPU code paths, each built on its own and run against the reference.

The default build uses every instruction set of the machine (here: AVX-512 with VBMI). Users
also run the AVX-512 path without VBMI (Skylake/Cascade Lake servers: gathers instead of byte
permutes), the AVX2 path (AMD Zen 1-3, Intel client cores: -mno-avx512f; with hardware gathers
and with scalar-load table lookups, DIST8_CPU_GATHER) and the portable
scalar build (DIST8_PORTABLE=1, any x86-64 or aarch64); each is rebuilt here in a subprocess
and held to the same bit-exact checks on a subset of cases (on a CPU without AVX-512 the default
build is the AVX2 build: the AVX2 rows run those checks on it, in each lookup mode, instead of
compiling it a second time).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from dist8.kernels import build, native

HERE = Path(__file__).resolve().parent
# the cpu backend's cases of tests/test_kernels.py (ids start with the backend: "cpu", "cpu-...")
CASES = ("cpu and (rules_fp32 and (ADAM or SGD or LION) or rules_dtypes and ADAM or linear_map or fp8_map or zero_blocks "
         "or quantize or extreme or trust_step or thread_count)")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


CPU_FLAGS = _cpu_flags()

VARIANTS = {
    "portable": ({"DIST8_PORTABLE": "1"}, None),
    "avx512-no-vbmi": ({"DIST8_CPU_FLAGS": "-mno-avx512vbmi"},
                       None if {"avx512f", "avx512bw", "avx512vl"} <= CPU_FLAGS else "CPU has no AVX-512"),
    # The AVX2 build with each of its table-lookup modes (DIST8_CPU_GATHER; one build, the
    # default mode depends on the CPU vendor): hardware gathers and scalar loads.
    "avx2-gather": ({"DIST8_CPU_FLAGS": "-mno-avx512f", "DIST8_CPU_GATHER": "hw"},
                    None if "avx2" in CPU_FLAGS else "CPU has no AVX2"),
    "avx2-scalar": ({"DIST8_CPU_FLAGS": "-mno-avx512f", "DIST8_CPU_GATHER": "scalar"},
                    None if "avx2" in CPU_FLAGS else "CPU has no AVX2"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_build_variant_matches_reference(variant, tmp_path):
    env_extra, skip_reason = VARIANTS[variant]
    if skip_reason:
        pytest.skip(f"{variant}: {skip_reason}")
    native_is_avx2 = variant.startswith("avx2") and "avx512f" not in CPU_FLAGS
    if native_is_avx2:  # no AVX-512 here: the default build is the AVX2 one; test it, don't build it twice
        import torch

        native.load_backend("cpu")
        assert torch.ops.dist8_cpu_info.features().startswith("avx2"), torch.ops.dist8_cpu_info.features()
        env_extra = {k: v for k, v in env_extra.items() if k != "DIST8_CPU_FLAGS"}
    env = dict(os.environ, **env_extra)
    # -n 0: one process (the project's addopts start two xdist workers, each importing torch)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-n", "0", "-p", "no:cacheprovider", str(HERE / "test_kernels.py"),
           "-k", CASES]
    out = subprocess.run(cmd, env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=900)
    tail = (out.stdout + out.stderr)[-3000:]
    assert out.returncode == 0, f"{variant} build failed its kernel tests:\n{tail}"
    assert " passed" in out.stdout and " failed" not in out.stdout, tail
    if native_is_avx2:
        return
    # and it really was that build (its own name, its own .so), not the default one
    default_name = build.build_name("cpu")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env_extra.items():
            mp.setenv(k, v)
        name, directory = build.build_name("cpu"), build.build_directory("cpu")
    assert name != default_name
    assert list(Path(directory).glob(f"{name}*.so")), f"no {name} library in {directory}"
