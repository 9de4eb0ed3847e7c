"""Building and loading dist8's compiled kernels, keyed by what they are built from.

One concern: turning ``csrc/`` into a loaded library once per source version. Each build
gets a name ``<prefix>_<12 hex digits>`` whose digits hash the contents of every file it
compiles or includes, the compiler flags, the compiler and the torch and Python versions
(:func:`content_name`), and its own directory of that name. A build that finished writes a
``<name>.built`` stamp next to its library; a later load with the same name loads that
library directly, without ninja. So two checkouts of the same sources (a CI clone, a git
worktree) share one build wherever they live, and any change to a source, a flag or a
version builds anew, side by side with the old one.

Environment:
    DIST8_BUILD_DIR   root of the build directories (default: ``$TORCH_EXTENSIONS_DIR``,
                      else ``~/.cache/torch_extensions``)
    DIST8_PORTABLE=1  build the CPU kernels without ``-march=native`` (scalar
                      quantization path, runs on any x86-64 / aarch64)
    DIST8_CPU_FLAGS   extra compiler flags for the CPU kernels, e.g.
                      "-mno-avx512vbmi" (built under a name of their own)
    DIST8_CUDA_ARCH   CUDA archs, e.g. "8.0;9.0" (default: the visible GPU's)
    DIST8_CUDA_PREBUILT  path of CUDA kernels built ahead (``bench/gpu_prebuild.sh``, against
                      the exact torch wheel this process runs) to load instead of building; refused
                      if its ``.sources`` stamp names other sources (csrc/) or nvcc flags
    DIST8_VERBOSE_BUILD=1  show the compiler's commands
The switches (``DIST8_PORTABLE``, ``DIST8_VERBOSE_BUILD``) take 1/0, true/false, yes/no, on/off;
anything else is refused naming the variable (:func:`dist8.env.env_flag`).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import time
from pathlib import Path

import torch

from dist8.env import env_flag

__all__ = [
    "build_directory", "build_name", "build_root", "content_name", "cpu_identity", "csrc_dir", "cuda_nvcc_flags",
    "cuda_sources_digest", "jit_load", "load_kernels",
]

_CUDA_CFLAGS = ["-O3", "-ffp-contract=off"]
_CUDA_NVCC_FLAGS = ["-O3", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]


def csrc_dir() -> Path:
    """The kernel sources: ``<repo>/csrc`` (source checkout) or ``dist8/csrc`` (installed)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if (candidate / "include" / "dist8_rules.h").is_file():
            return candidate
    raise FileNotFoundError("dist8: kernel sources (csrc/) not found next to the package")


def build_root() -> Path:
    """Where build directories live: ``$DIST8_BUILD_DIR``, else ``$TORCH_EXTENSIONS_DIR``, else
    ``~/.cache/torch_extensions``."""
    root = os.environ.get("DIST8_BUILD_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _hash_files(h, files: list[Path]) -> None:
    """Feed each file's name and contents, in the given order, to the hash ``h``."""
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")


def content_name(prefix: str, files: list[Path], flags: list[str]) -> str:
    """``<prefix>_<12 hex digits>``: sha256 of ``files`` (names and contents), ``flags``, the
    compiler (``$CXX``) and the torch and Python versions. Not the files' location: equal
    sources anywhere share one build."""
    h = hashlib.sha256()
    _hash_files(h, sorted(files, key=lambda p: p.name))
    context = [torch.__version__, f"py{sys.version_info[0]}.{sys.version_info[1]}", os.environ.get("CXX", "c++"), *flags]
    h.update("\0".join(context).encode())
    return f"{prefix}_{h.hexdigest()[:12]}"


def jit_load(name: str, sources: list[Path], include_dirs: list[Path], **cpp_extension_kwargs) -> bool:
    """Load the library ``name`` (a :func:`content_name`) from ``build_root()/name``, building it
    first with :func:`torch.utils.cpp_extension.load` unless a finished build's stamp is there.

    Returns True if it compiled. Concurrent first loads (pytest workers, ranks) build once:
    torch's build lock makes the others wait, then they load the same library.
    """
    from torch.utils import cpp_extension

    directory = build_root() / name
    library, stamp = directory / f"{name}.so", directory / f"{name}.built"
    if stamp.is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return False
    directory.mkdir(parents=True, exist_ok=True)
    # Every build says so: a build nobody expected (e.g. a changed flag) is visible.
    print(f"dist8: building {name} in {directory} (once per source version; the CPU kernels take about 85 s "
          "on two idle cores, the CUDA kernels minutes)...", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(d) for d in include_dirs],
        build_directory=str(directory),
        is_python_module=False,
        verbose=env_flag("DIST8_VERBOSE_BUILD"),
        **cpp_extension_kwargs,
    )
    stamp.write_text(f"{' '.join(str(s) for s in sources)}\n")
    print(f"dist8: built {name} in {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
    return True


# ---- the kernels of dist8 ------------------------------------------------------------------------
def cpu_compile_flags() -> list[str]:
    """The compiler flags of the CPU kernels' build: optimisation and exact-float flags, OpenMP,
    ``-march=native`` (x86-64; ``-mcpu=native`` elsewhere) or ``-DDIST8_NO_SIMD`` under
    ``DIST8_PORTABLE=1``, then ``DIST8_CPU_FLAGS``."""
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    if env_flag("DIST8_PORTABLE"):
        flags.append("-DDIST8_NO_SIMD")
    else:
        import platform

        if platform.machine() in ("x86_64", "AMD64"):
            flags += ["-march=native", "-mprefer-vector-width=512"]
        else:
            flags += ["-mcpu=native"]
    return flags + os.environ.get("DIST8_CPU_FLAGS", "").split()


@functools.lru_cache(maxsize=1)
def cpu_identity() -> str:
    """What ``-march=native`` compiles for: this CPU's model name and instruction-set flags (Linux:
    ``/proc/cpuinfo``; elsewhere the platform's processor string). Part of a native build's key, so
    a build cache shared by different machines (an NFS home on a cluster) never hands one CPU a
    library compiled for another's instructions."""
    import platform

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")  # x86, aarch64
    seen = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in wanted:
            seen.setdefault(key.strip(), " ".join(sorted(value.split())) if key.strip() in ("flags", "Features")
                            else value.strip())
    return "; ".join(f"{k}={seen[k]}" for k in sorted(seen)) or f"{platform.machine()} {platform.processor()}"


def _inputs(kind: str) -> tuple[list[Path], list[str]]:
    """The files a ``kind`` build compiles or includes, and its flags (with what else its output depends on)."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    src = csrc_dir()
    files = [p for d in (src / "include", src / kind) for p in d.iterdir() if p.is_file()]
    if kind == "cpu":
        flags = cpu_compile_flags()
        native = any(f.startswith(("-march=native", "-mcpu=native")) for f in flags)
        return files, flags + ([cpu_identity()] if native else [])
    arch = os.environ.get("DIST8_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"
    return files, [*_CUDA_CFLAGS, *_CUDA_NVCC_FLAGS, arch, str(torch.version.cuda)]


def build_name(kind: str) -> str:
    """The name of the ``kind`` ("cpu" or "cuda") kernels of these sources and flags:
    ``dist8_<kind>[_portable]_<12 hex digits>`` (:func:`content_name`; ``DIST8_CPU_FLAGS``,
    ``DIST8_PORTABLE``, the CUDA archs and, for ``-march=native`` builds, :func:`cpu_identity`
    included), so build variants and CPUs never share a directory."""
    portable = "_portable" if kind == "cpu" and env_flag("DIST8_PORTABLE") else ""
    return content_name(f"dist8_{kind}{portable}", *_inputs(kind))


def build_directory(kind: str) -> str:
    """Where the ``kind`` kernels of these sources are built: ``build_root()/build_name(kind)``."""
    return str(build_root() / build_name(kind))


def cuda_nvcc_flags() -> list[str]:
    """The nvcc flags of the CUDA build (torch's extension defaults, then dist8's own): also what
    ``bench/gpu_prebuild.sh`` and the compile-only tests pass, so every build compiles alike."""
    from torch.utils import cpp_extension

    return [*cpp_extension.COMMON_NVCC_FLAGS, *_CUDA_NVCC_FLAGS]


def cuda_sources_digest() -> str:
    """What a prebuilt library must match: the CUDA build's sources (names and contents) and
    dist8's own nvcc flags."""
    h = hashlib.sha256()
    _hash_files(h, sorted(_inputs("cuda")[0]))  # by path: the order the stamps of existing prebuilt libraries used
    h.update("\0".join(_CUDA_NVCC_FLAGS).encode())
    return h.hexdigest()


def _load_prebuilt_cuda(path: str) -> None:
    """Load CUDA kernels built ahead (DIST8_CUDA_PREBUILT), refusing a stale or unlabelled one."""
    stamp = Path(path + ".sources")
    if not Path(path).is_file() or not stamp.is_file():
        raise RuntimeError(f"DIST8_CUDA_PREBUILT={path}: needs the library and its {stamp.name} "
                           "(bench/gpu_prebuild.sh writes both)")
    lines = stamp.read_text().split()
    if not lines or lines[0] != cuda_sources_digest():
        raise RuntimeError(f"DIST8_CUDA_PREBUILT={path}: built from other sources than {csrc_dir()} "
                           "or flags (rebuild it with bench/gpu_prebuild.sh, or unset DIST8_CUDA_PREBUILT to build here)")
    torch.ops.load_library(path)
    print(f"dist8: loaded the prebuilt CUDA kernels {path} ({' '.join(lines[1:])})", file=sys.stderr, flush=True)


def load_kernels(kind: str) -> None:
    """Build (once per source version) and load dist8's ``kind`` ("cpu" or "cuda") kernels, which
    implement the ops :mod:`dist8.kernels.native` defines."""
    src = csrc_dir()
    if kind == "cpu":
        # The ops (the longest file: ATen's headers) first, then the block loops, a few rules per
        # file: ninja compiles them side by side (one file with every rule took ~80 s of one core).
        sources = [src / "cpu" / "dist8_cpu.cpp", *sorted((src / "cpu").glob("blocks_*_cpu.cpp"))]
        kwargs = dict(extra_cflags=cpu_compile_flags(), extra_ldflags=["-fopenmp"], with_cuda=False)
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("dist8: CUDA kernels requested but torch.cuda.is_available() is False")
        if os.environ.get("DIST8_CUDA_PREBUILT"):
            _load_prebuilt_cuda(os.environ["DIST8_CUDA_PREBUILT"])
            return
        if os.environ.get("DIST8_CUDA_ARCH"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["DIST8_CUDA_ARCH"]
        sources = [src / "cuda" / "dist8_cuda.cu"]
        kwargs = dict(extra_cflags=list(_CUDA_CFLAGS), extra_cuda_cflags=list(_CUDA_NVCC_FLAGS), with_cuda=True)
    else:
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    jit_load(build_name(kind), sources, [src / "include"], **kwargs)
