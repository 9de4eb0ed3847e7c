"""The JIT kernel build is keyed by its inputs: two checkouts (or versions) never rebuild each other.

Each checkout here is a copy of ``csrc/`` whose kernel source is replaced by a one-line C++
file (no torch headers), so the real ``torch.utils.cpp_extension.load`` + ninja path runs in
seconds instead of minutes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from dist8.kernels import native


def _checkout(root: Path, body: str) -> Path:
    src = root / "csrc"
    shutil.copytree(native.csrc_dir(), src)
    (src / "cpu" / "dist8_cpu.cpp").write_text(f"extern \"C\" int dist8_build_cache_probe() {{ {body} }}\n")
    return src


def _mtimes(directory: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(directory).iterdir() if p.suffix in (".o", ".so")}


def test_build_name_keys_sources_flags_torch_and_checkout(tmp_path, monkeypatch):
    a = _checkout(tmp_path / "a", "return 1;")
    b = _checkout(tmp_path / "b", "return 2;")
    b_same = _checkout(tmp_path / "b-copy", "return 2;")
    names = {}
    for label, src in (("a", a), ("b", b), ("b-copy", b_same)):
        monkeypatch.setattr(native, "csrc_dir", lambda src=src: src)
        names[label] = native.build_name("cpu")
        assert names[label] == native.build_name("cpu")  # stable
    assert len(set(names.values())) == 3  # other sources, or another checkout of the same sources
    monkeypatch.setattr(native, "csrc_dir", lambda: a)
    monkeypatch.setenv("DIST8_CPU_FLAGS", "-mno-avx512vbmi")
    with_flags = native.build_name("cpu")
    monkeypatch.delenv("DIST8_CPU_FLAGS")
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_torch = native.build_name("cpu")
    assert len({names["a"], with_flags, other_torch}) == 3
    assert all(n.startswith("dist8_cpu_") for n in (*names.values(), with_flags, other_torch))


def test_two_checkouts_do_not_rebuild_each_other(tmp_path, monkeypatch, capfd):
    """Build checkout A, then B (other sources), then A and B again: two builds, the second round reuses them."""
    monkeypatch.setenv("DIST8_BUILD_DIR", str(tmp_path / "builds"))
    checkouts = {"a": _checkout(tmp_path / "a", "return 1;"), "b": _checkout(tmp_path / "b", "return 2;")}
    first: dict[str, dict[str, int]] = {}
    for round_ in range(2):
        for label, src in checkouts.items():
            monkeypatch.setattr(native, "csrc_dir", lambda src=src: src)
            native._load_extension("cpu")
            directory = native.build_directory("cpu")
            err = capfd.readouterr().err
            built = _mtimes(directory)
            assert any(n.endswith(".so") for n in built), (label, os.listdir(directory))
            if round_ == 0:
                assert f"dist8: building the cpu kernels {native.build_name('cpu')}" in err, err
                first[label] = built
            else:
                assert "dist8: building" not in err, (label, err)
                assert built == first[label], f"checkout {label} was rebuilt"
    assert len(os.listdir(tmp_path / "builds")) == 2  # one build directory per checkout


def test_prebuilt_cuda_kernels_must_match_the_sources(tmp_path, monkeypatch):
    """DIST8_CUDA_PREBUILT (bench/gpu_prebuild.sh's library for a short GPU lease) is loaded only with
    a .sources stamp equal to this checkout's CUDA sources: a stale or unlabelled one is refused
    in one line naming the variable, before anything is loaded."""
    import pytest

    lib = tmp_path / "dist8_cuda.so"
    lib.write_bytes(b"not a library")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DIST8_CUDA_PREBUILT", str(lib))
    monkeypatch.setattr(torch.ops, "load_library", lambda path: pytest.fail("a refused library was loaded"))
    with pytest.raises(RuntimeError, match=r"DIST8_CUDA_PREBUILT=.*needs the library and its dist8_cuda.so.sources"):
        native.load_backend("cuda")
    (tmp_path / "dist8_cuda.so.sources").write_text("0" * 64 + "\ntorch-x sm_90\n")
    with pytest.raises(RuntimeError, match=r"DIST8_CUDA_PREBUILT=.*built from other sources than .*csrc"):
        native.load_backend("cuda")
    loaded = []
    monkeypatch.setattr(torch.ops, "load_library", loaded.append)
    monkeypatch.setattr(native, "NativeBackend", lambda kind: kind)  # no real ops behind the fake library
    monkeypatch.setattr(native, "_backends", {})
    (tmp_path / "dist8_cuda.so.sources").write_text(native.cuda_sources_digest() + "\ntorch-x sm_90\n")
    assert native.load_backend("cuda") == "cuda" and loaded == [str(lib)]
