"""Native (C++ / CUDA) fused update kernels: their ops and the backend that calls them.

One concern: the ops' schemas (registered in the ``dist8`` torch.library namespace:
``torch.ops.dist8.fused_update_``, ``fused_update_multi_``, ``quantize_blockwise``,
``dequantize_blockwise``, ``all_finite``, ``all_finite_multi`` and ``trust_step_``) and
:class:`NativeBackend`, which checks arguments and calls them, with the interface of
:class:`dist8.kernels.reference.ReferenceBackend`. ``load_backend("cpu")`` /
``load_backend("cuda")`` builds the kernels on first use (:mod:`dist8.kernels.build`:
``csrc/cpu/*.cpp`` or ``csrc/cuda/dist8_cuda.cu``, keyed by their contents; its docstring
lists the environment variables) and returns the backend.
"""
from __future__ import annotations

import threading

import torch

from dist8.kernels.build import load_kernels
from dist8.kernels.reference import check_correction
from dist8.kernels.rules import RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars

NUM_SCALARS = len(Scalars().as_tuple())

__all__ = ["load_backend", "NativeBackend", "OP_SCHEMAS", "scalar_values"]

# The ops the kernels implement, by name: the one list the CPU, CUDA and emulated CUDA builds register.
OP_SCHEMAS = {
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


def _define_ops() -> None:
    global _library
    if _library is not None:
        return
    lib = torch.library.Library("dist8", "DEF")  # noqa: TOR901 - the ops are implemented in C++
    for schema in OP_SCHEMAS.values():
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


def scalar_values(scalars) -> list[float]:
    """The per-step scalars (NUM_SCALARS of them) as the ops take them."""
    values = [float(x) for x in (scalars.as_tuple() if isinstance(scalars, Scalars) else scalars)]
    if len(values) != NUM_SCALARS:
        raise ValueError(f"scalars must have {NUM_SCALARS} values, got {len(values)}")
    return values


class NativeBackend:
    """Fused update kernels of one device kind.

    Args:
        kind: "cpu" or "cuda": the device type of the tensors the ops take.
        ops: the torch.ops namespace that implements :data:`OP_SCHEMAS`. Default None: ``torch.ops.dist8``
            (the tests pass another build of the same ops, e.g. the emulated CUDA kernels).
        name: the backend's name in messages. Default None: ``kind``.

    Attributes:
        ops: the ops namespace it calls.
    """

    def __init__(self, kind: str, ops=None, name: str | None = None):
        self.name = name or kind
        self._device_type = kind
        self._empty: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.ops = ops if ops is not None else torch.ops.dist8

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
        values = scalar_values(scalars)
        (s1, a1, q1), (s2, a2, q2), (s3, a3, _) = args
        counts = self._counts(skipped, 1, device)
        corr = self._correction(p, correction)
        with torch.no_grad():
            self.ops.fused_update_(
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
        values = scalar_values(scalars)
        counts = self._counts(skipped, len(updates), device)
        s3, a3 = (cols[6], cols[7]) if three else ([], [])
        corrs = [] if corrections is None else [self._correction(row[0], c) for row, c in zip(updates, corrections)]
        with torch.no_grad():
            self.ops.fused_update_multi_(int(rule), *cols[:6], q1, q2, values, int(flags), int(block_size), counts,
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
            self.ops.trust_step_(p, u, float(lr_times_ratio), self._correction(p, correction))

    def quantize_blockwise(self, x: torch.Tensor, qmap: torch.Tensor, block_size: int = 256):
        """Like :func:`dist8.quant.quantize_blockwise` (bit-identical)."""
        if block_size < 64 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 64, got {block_size}")
        q = self._qmap(qmap, "qmap", x.device)
        return self.ops.quantize_blockwise(x.detach(), q, int(block_size))

    def dequantize_blockwise(self, codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor, block_size: int = 256):
        """Like :func:`dist8.quant.dequantize_blockwise` (bit-identical)."""
        if block_size < 64 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 64, got {block_size}")
        nb = (codes.numel() + block_size - 1) // block_size
        if absmax.numel() != nb:
            raise ValueError(f"absmax has {absmax.numel()} entries but {codes.numel()} codes need {nb}")
        q = self._qmap(qmap, "qmap", codes.device)
        return self.ops.dequantize_blockwise(codes.detach(), absmax.detach(), q, int(block_size))

    def all_finite(self, grad: torch.Tensor) -> bool:
        """True when every element of ``grad`` is finite."""
        return bool(self.ops.all_finite(grad.detach()))

    def all_finite_many(self, grads: list[torch.Tensor]) -> list[bool]:
        """:meth:`all_finite` of each tensor: one parallel pass over all of them (CUDA: one host sync)."""
        if len(grads) > 1:
            return [not bad for bad in self.ops.all_finite_multi([g.detach() for g in grads])]
        return [self.all_finite(g) for g in grads]


def load_backend(kind: str) -> NativeBackend:
    """Build (first use) and load the ``kind`` ("cpu" or "cuda") kernels; raises if the build fails."""
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"kind must be 'cpu' or 'cuda', got {kind!r}")
    with _lock:
        backend = _backends.get(kind)
        if backend is None:
            _define_ops()
            load_kernels(kind)
            backend = _backends[kind] = NativeBackend(kind)
        return backend
