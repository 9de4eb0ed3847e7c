"""Native (C++ / CUDA) fused update kernels, built on first use.

One concern: loading the native kernels (keyed JIT build, op registration) and the backend
that checks arguments and calls them.

``load_backend("cpu")`` / ``load_backend("cuda")`` JIT-compiles ``csrc/cpu/dist8_cpu.cpp``
or ``csrc/cuda/dist8_cuda.cu`` with :func:`torch.utils.cpp_extension.load` (ninja;
cached in the default torch extensions directory, or ``DIST8_BUILD_DIR``) and
returns a backend with the interface of
:class:`dist8.kernels.reference.ReferenceBackend`. The ops are registered in the
``dist8`` torch.library namespace: ``torch.ops.dist8.fused_update_``,
``quantize_blockwise``, ``dequantize_blockwise``, ``all_finite`` and ``trust_step_``.

Environment:
    DIST8_BUILD_DIR   where to build (default: torch's extensions directory)
    DIST8_PORTABLE=1  build the CPU kernels without ``-march=native`` (scalar
                      quantization path, runs on any x86-64 / aarch64)
    DIST8_CPU_FLAGS   extra compiler flags for the CPU kernels, e.g.
                      "-mno-avx512vbmi" (built under a name of their own)
    DIST8_CUDA_ARCH   CUDA archs, e.g. "8.0;9.0" (default: the visible GPU's)
    DIST8_CUDA_PREBUILT  path of CUDA kernels built ahead (``bench/gpu_prebuild.sh``, against
                      the exact torch wheel this process runs) to load instead of building; refused
                      if its ``.sources`` stamp names other sources (csrc/) or nvcc flags
"""
from __future__ import annotations

import glob
import os
import sys
import threading
from pathlib import Path

import torch

from dist8.kernels.reference import check_correction
from dist8.kernels.rules import RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars

NUM_SCALARS = len(Scalars().as_tuple())

__all__ = ["build_directory", "build_name", "load_backend", "NativeBackend", "csrc_dir"]

_SCHEMAS = {
    "fused_update_": (
        "fused_update_(int rule, Tensor(a!) param, Tensor grad, Tensor(b!) state1, Tensor(c!) state2, "
        "Tensor(d!) absmax1, Tensor(e!) absmax2, Tensor qmap1, Tensor qmap2, float[] scalars, int flags, "
        "int block_size, Tensor(f!) update_out, Tensor(g!) skipped, Tensor(i!) state3, Tensor(j!) absmax3, "
        "Tensor(h!) correction) -> ()"
    ),
    # One update for many tensors (same rule, scalars, flags, block size; no update_out).
    # state3/absmax3: a third state (AdEMAMix's slow EMA, quantized with qmap1); empty = absent.
    "fused_update_multi_": (
        "fused_update_multi_(int rule, Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state1, "
        "Tensor(c!)[] state2, Tensor(d!)[] absmax1, Tensor(e!)[] absmax2, Tensor qmap1, Tensor qmap2, "
        "float[] scalars, int flags, int block_size, Tensor(f!) skipped, Tensor(i!)[] state3, Tensor(j!)[] absmax3, "
        "Tensor(h!)[] correction) -> ()"
    ),
    "quantize_blockwise": "quantize_blockwise(Tensor x, Tensor qmap, int block_size) -> (Tensor, Tensor)",
    "dequantize_blockwise": "dequantize_blockwise(Tensor codes, Tensor absmax, Tensor qmap, int block_size) -> Tensor",
    "all_finite": "all_finite(Tensor x) -> bool",
    "all_finite_multi": "all_finite_multi(Tensor[] xs) -> int[]",
    # LAMB/LARS phase 2: param <- param - fl32(lr * trust ratio) * update (rules.trust_step).
    # With a master-weight correction (last argument; empty = none): decode, step, re-encode.
    "trust_step_": "trust_step_(Tensor(a!) param, Tensor update, float lr_times_ratio, Tensor(b!) correction) -> ()",
}

_lock = threading.Lock()
_library = None
_backends: dict[str, "NativeBackend"] = {}


def csrc_dir() -> Path:
    """The kernel sources: ``<repo>/csrc`` (source checkout) or ``dist8/csrc`` (installed)."""
    here = Path(__file__).resolve()
    for candidate in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if (candidate / "include" / "dist8_rules.h").is_file():
            return candidate
    raise FileNotFoundError("dist8: kernel sources (csrc/) not found next to the package")


def _define_ops() -> None:
    global _library
    if _library is not None:
        return
    lib = torch.library.Library("dist8", "DEF")  # noqa: TOR901 - the ops are implemented in C++
    for schema in _SCHEMAS.values():
        lib.define(schema)
    _register_fakes(lib)
    _library = lib


def _register_fakes(lib) -> None:
    """Shapes without data, so that torch.compile / torch.export can trace the ops.

    The update ops only mutate their arguments; the finite checks return host values
    that depend on the data and stay outside traced graphs.
    """
    def no_output(*args):
        return None

    def quantize_fake(x, qmap, block_size):
        blocks = (x.numel() + block_size - 1) // block_size
        return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)

    def dequantize_fake(codes, absmax, qmap, block_size):
        return codes.new_empty(codes.shape, dtype=torch.float32)

    torch.library.register_fake("dist8::fused_update_", no_output, lib=lib)
    torch.library.register_fake("dist8::fused_update_multi_", no_output, lib=lib)
    torch.library.register_fake("dist8::trust_step_", no_output, lib=lib)
    torch.library.register_fake("dist8::quantize_blockwise", quantize_fake, lib=lib)
    torch.library.register_fake("dist8::dequantize_blockwise", dequantize_fake, lib=lib)


def _build_dir(name: str) -> str | None:
    root = os.environ.get("DIST8_BUILD_DIR")
    if not root:
        return None
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def _needs_build(name: str, build_dir: str | None, sources: list[Path]) -> bool:
    from torch.utils import cpp_extension

    directory = build_dir or cpp_extension._get_build_directory(name, verbose=False)
    built = glob.glob(os.path.join(directory, f"{name}*.so"))
    if not built:
        return True
    newest_src = max(p.stat().st_mtime for p in sources)
    return max(os.path.getmtime(b) for b in built) < newest_src


def _cpu_flags() -> list[str]:
    flags = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    if os.environ.get("DIST8_PORTABLE", "") not in ("", "0"):
        flags.append("-DDIST8_NO_SIMD")
    else:
        import platform

        if platform.machine() in ("x86_64", "AMD64"):
            flags += ["-march=native", "-mprefer-vector-width=512"]
        else:
            flags += ["-mcpu=native"]
    return flags + os.environ.get("DIST8_CPU_FLAGS", "").split()


_CUDA_CFLAGS = ["-O3", "-ffp-contract=off"]
_CUDA_NVCC_FLAGS = ["-O3", "--fmad=false", "-Xcompiler", "-ffp-contract=off"]


def _build_inputs(kind: str) -> tuple[list[Path], list[str]]:
    """The files a ``kind`` build compiles or includes, and everything else its output depends on."""
    src = csrc_dir()
    sub = "cpu" if kind == "cpu" else "cuda"
    files = sorted(p for d in (src / "include", src / sub) for p in d.iterdir() if p.is_file())
    if kind == "cpu":
        flags = _cpu_flags()
    else:
        flags = _CUDA_CFLAGS + _CUDA_NVCC_FLAGS + [os.environ.get("DIST8_CUDA_ARCH")
                                                   or os.environ.get("TORCH_CUDA_ARCH_LIST") or "visible GPU"]
        flags.append(str(torch.version.cuda))
    # The checkout's path too: ninja rebuilds when the source paths in build.ninja change, so two
    # checkouts with equal sources sharing a directory would still rebuild each other.
    context = [str(src), torch.__version__, f"py{sys.version_info[0]}.{sys.version_info[1]}",
               os.environ.get("CXX", "c++"), *flags]
    return files, context


def _digest(files: list[Path], context: list[str]) -> str:
    """sha256 (hex) of ``files`` (names and contents) and the strings of ``context``."""
    import hashlib

    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update("\0".join(context).encode())
    return h.hexdigest()


def cuda_nvcc_flags() -> list[str]:
    """The nvcc flags of the CUDA build (torch's extension defaults, then dist8's own): also what
    ``bench/gpu_prebuild.sh`` and the compile-only tests pass, so every build compiles alike."""
    from torch.utils import cpp_extension

    return [*cpp_extension.COMMON_NVCC_FLAGS, *_CUDA_NVCC_FLAGS]


def cuda_sources_digest() -> str:
    """What a prebuilt library must match: the CUDA build's sources (names and contents) and
    dist8's own nvcc flags."""
    return _digest(_build_inputs("cuda")[0], _CUDA_NVCC_FLAGS)


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


def build_name(kind: str) -> str:
    """The extension's name for this checkout: ``dist8_<kind>[_portable]_<12 hex digits>``.

    The digits hash the sources' contents, the checkout's path, the compiler flags (also
    ``DIST8_CPU_FLAGS``, ``DIST8_PORTABLE``, the CUDA archs), the compiler and the torch and Python
    versions, so that checkouts, versions and build variants never share (and rebuild) one
    build directory.
    """
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    portable = "_portable" if kind == "cpu" and os.environ.get("DIST8_PORTABLE", "") not in ("", "0") else ""
    return f"dist8_{kind}{portable}_{_digest(*_build_inputs(kind))[:12]}"


def build_directory(kind: str) -> str:
    """Where the ``kind`` kernels of this checkout are built: ``$DIST8_BUILD_DIR/<name>``, else
    torch's extensions directory (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)."""
    from torch.utils import cpp_extension

    name = build_name(kind)
    return _build_dir(name) or cpp_extension._get_build_directory(name, verbose=False)


def _load_extension(kind: str) -> None:
    import time

    from torch.utils import cpp_extension

    src = csrc_dir()
    include = str(src / "include")
    if kind == "cpu":
        sources = [src / "cpu" / "dist8_cpu.cpp"]
        kwargs = dict(extra_cflags=_cpu_flags(), extra_ldflags=["-fopenmp"], with_cuda=False)
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
    name = build_name(kind)
    build_dir = build_directory(kind)
    os.makedirs(build_dir, exist_ok=True)
    building = _needs_build(name, build_dir, _build_inputs(kind)[0])
    if building:
        # Every build says so: a build nobody expected (e.g. a cache shared with another checkout) is visible.
        print(f"dist8: building the {kind} kernels {name} in {build_dir} (once per source version; "
              f"about 40 s of compiler time, 1-2 min on a busy machine)...", file=sys.stderr, flush=True)
    tic = time.perf_counter()
    cpp_extension.load(
        name=name,
        sources=[str(s) for s in sources],
        extra_include_paths=[include],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("DIST8_VERBOSE_BUILD", "") not in ("", "0"),
        **kwargs,
    )
    if building:
        print(f"dist8: built {name} in {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(t: torch.Tensor, name: str, numel: int, device: torch.device, dtypes) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but param is on {device}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {tuple(str(d) for d in dtypes)}")
    if t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (a contiguous view with a storage offset is fine)")
    return t.detach()


def _scalar_values(scalars) -> list[float]:
    """The per-step scalars (NUM_SCALARS of them) as the ops take them."""
    values = [float(x) for x in (scalars.as_tuple() if isinstance(scalars, Scalars) else scalars)]
    if len(values) != NUM_SCALARS:
        raise ValueError(f"scalars must have {NUM_SCALARS} values, got {len(values)}")
    return values


class NativeBackend:
    """Fused update kernels of one device kind ("cpu" or "cuda")."""

    def __init__(self, kind: str):
        self.name = kind
        self._device_type = kind
        self._empty: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._ops = torch.ops.dist8

    def _none(self, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An empty tensor that stands for an absent argument (cached per device and dtype)."""
        key = (device, dtype)
        t = self._empty.get(key)
        if t is None:
            t = self._empty[key] = torch.empty(0, dtype=dtype, device=device)
        return t

    def _qmap(self, qmap, name: str, device: torch.device) -> torch.Tensor:
        if qmap is None:
            raise ValueError(f"{name} is required for an 8-bit state")
        if qmap.dtype != torch.float32 or qmap.numel() != 256:
            raise ValueError(f"{name} must be float32 with 256 entries, got {qmap.dtype} with {qmap.numel()}")
        if qmap.device != device:
            qmap = qmap.to(device)
        return qmap.detach().contiguous()

    def fused_update(
        self,
        rule: Rule,
        param: torch.Tensor,
        grad: torch.Tensor,
        state1: torch.Tensor,
        state2: torch.Tensor | None,
        absmax1: torch.Tensor | None,
        absmax2: torch.Tensor | None,
        qmap1: torch.Tensor | None,
        qmap2: torch.Tensor | None,
        scalars: Scalars,
        flags: int,
        block_size: int,
        update_out: torch.Tensor | None = None,
        skipped: torch.Tensor | None = None,
        state3: torch.Tensor | None = None,
        absmax3: torch.Tensor | None = None,
        correction: torch.Tensor | None = None,
    ) -> None:
        """Same contract as :meth:`ReferenceBackend.fused_update`, bit-identical results."""
        rule = Rule(rule)
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"block_size must be an int, got {type(block_size).__name__}")
        if block_size < 64 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 64, got {block_size}")
        device = param.device
        if device.type != self._device_type:
            raise ValueError(f"param is on {device}; the {self.name} backend updates {self._device_type} tensors")
        n = param.numel()
        p = _check_tensor(param, "param", n, device, _FLOATS)
        g = _check_tensor(grad, "grad", n, device, _FLOATS)
        nblocks = (n + block_size - 1) // block_size
        nstates = len(RULE_STATES[rule])
        empty = self._none(device)
        args = []
        slots = ((state1, absmax1, qmap1), (state2, absmax2, qmap2), (state3, absmax3, qmap1))  # state 3: qmap1
        for i, (state, absmax, qmap) in enumerate(slots, start=1):
            if i > nstates:
                args.append((empty, empty, empty))
                continue
            if state is None:
                raise ValueError(f"state{i} is required by {rule.name}")
            if absmax is None:
                s = _check_tensor(state, f"state{i}", n, device, (torch.float32,))
                args.append((s, empty, empty))
            else:
                s = _check_tensor(state, f"state{i}", n, device, (torch.uint8,))
                a = _check_tensor(absmax, f"absmax{i}", nblocks, device, (torch.float32,))
                args.append((s, a, self._qmap(qmap, f"qmap{i}", device)))
        if update_out is not None:
            out = _check_tensor(update_out, "update_out", n, device, _FLOATS)
        else:
            out = empty
        values = _scalar_values(scalars)
        (s1, a1, q1), (s2, a2, q2), (s3, a3, _) = args
        counts = self._counts(skipped, 1, device)
        corr = self._correction(p, correction)
        with torch.no_grad():
            self._ops.fused_update_(
                int(rule), p, g, s1, s2, a1, a2, q1, q2, values, int(flags), int(block_size), out, counts, s3, a3, corr
            )

    def _correction(self, param: torch.Tensor, correction: torch.Tensor | None) -> torch.Tensor:
        """The op's correction argument: the checked tensor, or an empty one (no master weights)."""
        if correction is None or not correction.numel():
            return self._none(param.device, torch.int8)
        check_correction(param, correction)
        return correction.detach()

    def _counts(self, skipped, count: int, device: torch.device) -> torch.Tensor:
        if skipped is None:
            return self._none(device, torch.int64)
        if skipped.dtype != torch.int64 or skipped.numel() != count or skipped.device != device or not skipped.is_contiguous():
            raise ValueError(f"skipped must be a contiguous int64 tensor of {count} element(s) on {device}")
        return skipped

    def fused_update_multi(self, rule: Rule, updates: list[tuple], qmap1, qmap2, scalars: Scalars, flags: int,
                           block_size: int, skipped: torch.Tensor | None = None,
                           corrections: list[torch.Tensor | None] | None = None) -> None:
        """:meth:`fused_update` for many tensors at once: ``updates`` holds one ``(param, grad,
        state1, state2, absmax1, absmax2)`` per tensor (rules with a third state: ``(..., state3,
        absmax3)``; ``None`` where absent), all with the same
        rule, scalars, flags and block size and no ``update_out``; ``corrections`` one master-weight
        correction per tensor (None where it has none). One kernel call on the CPU (the
        per-call cost of ~30 us per tensor is paid once), one launch per 24 tensors on CUDA.
        """
        rule = Rule(rule)
        if rule in RULE_WRITES_UPDATE or not updates:
            for i, row in enumerate(updates):
                self.fused_update(rule, *row[:6], qmap1, qmap2, scalars, flags, block_size,
                                  skipped=None if skipped is None else skipped[i:i + 1],
                                  correction=None if corrections is None else corrections[i])
            return
        if corrections is not None and len(corrections) != len(updates):
            raise ValueError(f"corrections has {len(corrections)} entries for {len(updates)} tensors")
        device = updates[0][0].device
        empty = self._none(device)
        q1 = self._qmap(qmap1, "qmap1", device) if qmap1 is not None else empty
        q2 = self._qmap(qmap2, "qmap2", device) if qmap2 is not None else empty
        three = len(RULE_STATES[rule]) > 2
        cols = [[] for _ in range(8 if three else 6)]  # no detach: the op runs under no_grad
        for row in updates:
            if three and len(row) < 8:
                raise ValueError(f"{rule.name} keeps three states: each update needs (param, grad, state1, state2, "
                                 "absmax1, absmax2, state3, absmax3)")
            for col, t in zip(cols, row):
                col.append(empty if t is None else t)
        values = _scalar_values(scalars)
        counts = self._counts(skipped, len(updates), device)
        s3, a3 = (cols[6], cols[7]) if three else ([], [])
        corrs = [] if corrections is None else [self._correction(row[0], c) for row, c in zip(updates, corrections)]
        with torch.no_grad():
            self._ops.fused_update_multi_(int(rule), *cols[:6], q1, q2, values, int(flags), int(block_size), counts,
                                          s3, a3, corrs)

    def trust_step(self, param: torch.Tensor, update: torch.Tensor, lr_times_ratio: float,
                   correction: torch.Tensor | None = None) -> None:
        """Same contract as :meth:`ReferenceBackend.trust_step`, bit-identical results."""
        device = param.device
        if device.type != self._device_type:
            raise ValueError(f"param is on {device}; the {self.name} backend updates {self._device_type} tensors")
        n = param.numel()
        p = _check_tensor(param, "param", n, device, _FLOATS)
        u = _check_tensor(update, "update", n, device, (torch.float32,))
        with torch.no_grad():
            self._ops.trust_step_(p, u, float(lr_times_ratio), self._correction(p, correction))

    def quantize_blockwise(self, x: torch.Tensor, qmap: torch.Tensor, block_size: int = 256):
        """Like :func:`dist8.quant.quantize_blockwise` (bit-identical)."""
        if block_size < 64 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 64, got {block_size}")
        q = self._qmap(qmap, "qmap", x.device)
        return self._ops.quantize_blockwise(x.detach(), q, int(block_size))

    def dequantize_blockwise(self, codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int = 256):
        """Like :func:`dist8.quant.dequantize_blockwise` (bit-identical)."""
        if block_size < 64 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 64, got {block_size}")
        nb = (codes.numel() + block_size - 1) // block_size
        if absmax.numel() != nb:
            raise ValueError(f"absmax has {absmax.numel()} entries but {codes.numel()} codes need {nb}")
        q = self._qmap(qmap, "qmap", codes.device)
        return self._ops.dequantize_blockwise(codes.detach(), absmax.detach(), q, int(block_size))

    def all_finite(self, grad: torch.Tensor) -> bool:
        """True when every element of ``grad`` is finite."""
        return bool(self._ops.all_finite(grad.detach()))

    def all_finite_many(self, grads: list[torch.Tensor]) -> list[bool]:
        """:meth:`all_finite` of each tensor: one parallel pass over all of them (CUDA: one host sync)."""
        if len(grads) > 1:
            return [not bad for bad in self._ops.all_finite_multi([g.detach() for g in grads])]
        return [self.all_finite(g) for g in grads]


def load_backend(kind: str) -> NativeBackend:
    """Build (first use) and load the ``kind`` ("cpu" or "cuda") kernels; raises if the build fails."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        backend = _backends.get(kind)
        if backend is None:
            _define_ops()
            _load_extension(kind)
            backend = _backends[kind] = NativeBackend(kind)
        return backend
