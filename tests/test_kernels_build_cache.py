"""The JIT kernel build is keyed by what it is built from: equal sources share one build wherever
they are checked out, and other sources, flags or versions never rebuild each other.

Each checkout here is a copy of ``csrc/`` whose ops file is replaced by a one-line C++ file
(no torch headers) and whose block-loop files are left out, so the real
``torch.utils.cpp_extension.load`` + ninja path runs in seconds instead of minutes.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from dist8.kernels import build, native


def _checkout(root: Path, body: str) -> Path:
    src = root / "csrc"
    shutil.copytree(build.csrc_dir(), src)
    (src / "cpu" / "dist8_cpu.cpp").write_text(f"extern \"C\" int dist8_build_cache_probe() {{ {body} }}\n")
    for blocks in (src / "cpu").glob("blocks_*_cpu.cpp"):
        blocks.unlink()
    return src


def _mtimes(directory: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in Path(directory).iterdir() if p.suffix in (".o", ".so")}


def test_build_name_keys_sources_flags_and_torch_not_the_checkout(tmp_path, monkeypatch):
    a = _checkout(tmp_path / "a", "return 1;")
    b = _checkout(tmp_path / "b", "return 2;")
    b_same = _checkout(tmp_path / "b-copy", "return 2;")
    (a / "include" / "dist8_rules.h").write_text((a / "include" / "dist8_rules.h").read_text() + "\n// a header edit\n")
    names = {}
    for label, src in (("b", b), ("b-copy", b_same), ("a-header", a)):
        monkeypatch.setattr(build, "csrc_dir", lambda src=src: src)
        names[label] = build.build_name("cpu")
        assert names[label] == build.build_name("cpu")  # stable
    assert names["b"] == names["b-copy"]  # the same sources elsewhere: one build
    assert names["a-header"] != names["b"]  # an included header is an input too
    monkeypatch.setattr(build, "csrc_dir", lambda: b)
    monkeypatch.setenv("DIST8_CPU_FLAGS", "-mno-avx512vbmi")
    with_flags = build.build_name("cpu")
    monkeypatch.delenv("DIST8_CPU_FLAGS")
    monkeypatch.setenv("DIST8_PORTABLE", "1")
    portable = build.build_name("cpu")
    monkeypatch.delenv("DIST8_PORTABLE")
    # another CPU (a build cache on a home directory shared by different machines): -march=native
    # builds differ, the portable build is the same
    real_cpu = build.cpu_identity()
    assert real_cpu and build.cpu_identity() == real_cpu
    monkeypatch.setattr(build, "cpu_identity", lambda: real_cpu + " another-model")
    other_cpu = build.build_name("cpu")
    monkeypatch.setenv("DIST8_PORTABLE", "1")
    assert build.build_name("cpu") == portable
    monkeypatch.delenv("DIST8_PORTABLE")
    monkeypatch.setattr(build, "cpu_identity", lambda: real_cpu)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    other_torch = build.build_name("cpu")
    assert len({names["b"], with_flags, portable, other_cpu, other_torch}) == 5
    assert portable.startswith("dist8_cpu_portable_")
    assert all(n.startswith("dist8_cpu_") for n in (*names.values(), with_flags, other_torch))


def test_checkouts_share_equal_builds_and_never_rebuild_each_other(tmp_path, monkeypatch, capfd):
    """Build checkout A, then B (other sources), then A's copy elsewhere, A and B again: two builds;
    the copy and the second round load the finished libraries without compiling."""
    monkeypatch.setenv("DIST8_BUILD_DIR", str(tmp_path / "builds"))
    checkouts = {"a": _checkout(tmp_path / "a", "return 1;"), "b": _checkout(tmp_path / "b", "return 2;"),
                 "a-copy": _checkout(tmp_path / "elsewhere" / "a", "return 1;")}
    built: dict[str, dict[str, int]] = {}
    for label in ("a", "b", "a-copy", "a", "b"):
        monkeypatch.setattr(build, "csrc_dir", lambda src=checkouts[label]: src)
        build.load_kernels("cpu")
        directory = build.build_directory("cpu")
        err = capfd.readouterr().err
        mtimes = _mtimes(directory)
        assert any(n.endswith(".so") for n in mtimes), (label, list(Path(directory).iterdir()))
        key = label.removesuffix("-copy")
        if key not in built:
            assert f"dist8: building {build.build_name('cpu')}" in err, err
            built[key] = mtimes
        else:
            assert "dist8: building" not in err, (label, err)
            assert mtimes == built[key], f"checkout {label} was rebuilt"
    assert len(list((tmp_path / "builds").iterdir())) == 2  # one build directory per distinct source


def test_an_unfinished_build_is_built_again_not_loaded(tmp_path, monkeypatch, capfd):
    """A library without its stamp (a build killed while linking) is never loaded as it is."""
    monkeypatch.setenv("DIST8_BUILD_DIR", str(tmp_path / "builds"))
    src = _checkout(tmp_path / "a", "return 1;")
    monkeypatch.setattr(build, "csrc_dir", lambda: src)
    directory = Path(build.build_directory("cpu"))
    directory.mkdir(parents=True)
    (directory / f"{build.build_name('cpu')}.so").write_bytes(b"half a library")
    build.load_kernels("cpu")
    assert "dist8: building" in capfd.readouterr().err
    assert (directory / f"{build.build_name('cpu')}.built").is_file()


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
    (tmp_path / "dist8_cuda.so.sources").write_text(build.cuda_sources_digest() + "\ntorch-x sm_90\n")
    assert native.load_backend("cuda") == "cuda" and loaded == [str(lib)]


def test_build_switches_take_the_usual_spellings_and_refuse_typos(monkeypatch, capsys):
    """Before: any DIST8_PORTABLE but "" or "0" meant a portable build ("false" too), and a failed
    build of any kind fell back to the reference backend with a warning, so a typo did as well."""
    from dist8.env import EnvironmentSettingError
    from dist8.kernels import registry

    monkeypatch.setenv("DIST8_PORTABLE", "1")
    portable = build.build_name("cpu")
    for off in ("", "0", "false", "No", " off "):
        monkeypatch.setenv("DIST8_PORTABLE", off)
        assert build.build_name("cpu") != portable, off
    for on in ("true", "YES", "on"):
        monkeypatch.setenv("DIST8_PORTABLE", on)
        assert build.build_name("cpu") == portable, on
    monkeypatch.setenv("DIST8_PORTABLE", "maybe")
    monkeypatch.setattr(registry, "_native", {})  # as in a process that has not loaded the kernels yet
    monkeypatch.setattr(registry, "_errors", {})
    monkeypatch.setattr(native, "_backends", {})
    with pytest.raises(EnvironmentSettingError, match="DIST8_PORTABLE must be 1 or 0 .*got 'maybe'"):
        registry.get_backend("cpu")
    assert registry._errors == {}  # not recorded as a failed build
    from dist8.cli import main

    assert main(["info"]) == 2
    assert "dist8 info: error: DIST8_PORTABLE must be 1 or 0" in capsys.readouterr().err
    # the dist8 command checks every variable before its sub-command starts (dist8 train's ranks each
    # failed with a traceback)
    monkeypatch.setenv("DIST8_PORTABLE", "0")
    for name, value, message in (("DIST8_CUDA_KERNEL", "wrap", "must be one of block, warp, got 'wrap'"),
                                 ("DIST8_BACKEND", "gpu", "must be one of reference, cpu, cuda, got 'gpu'"),
                                 ("DIST8_CPU_GATHER", "HW", "must be one of hw, scalar, got 'HW'"),
                                 ("DIST8_CPU_CODES", "lut", "must be one of runs, table, got 'lut'"),
                                 ("DIST8_VERBOSE_BUILD", "2", "must be 1 or 0")):
        monkeypatch.setenv(name, value)
        assert main(["train", "--config", "configs/tiny-gpt.yaml"]) == 2
        assert capsys.readouterr().err.startswith(f"dist8 train: error: {name} {message}")
        monkeypatch.delenv(name)
