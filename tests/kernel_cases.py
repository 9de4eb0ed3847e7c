"""The cases of tests/test_kernels.py (every backend against the reference): every rule, 8/32-bit
state, param/grad dtypes, odd sizes, block sizes, flags and magnitudes, stepped side by side
with the reference backend on identical inputs, and the checks shared by several tests.

A new rule needs a branch in :func:`scalars_for` (and, if its states square the gradient,
an entry in MAGNITUDES); everything else follows ``RULE_STATES`` / ``RULE_WRITES_UPDATE``."""
from __future__ import annotations

import math

import pytest
import torch

from dist8.kernels.reference import ReferenceBackend
from dist8.kernels.rules import FLAG_FIRST_STEP, FLAG_NESTEROV, RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars
from dist8.quant import dequantize_blockwise, dynamic_map, fp8_map, get_map, linear_map, quantize_blockwise

REFERENCE = ReferenceBackend()

# ---- the backends under test (fixtures in tests/conftest.py) ---------------------------------
BACKEND_IDS = ("cpu", "cuda-block", "cuda-warp", "emulated-block", "emulated-warp")
_NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
_MARKS = {"cpu": (), "emulated": (),
          "cuda": (pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=_NO_CUDA))}


def _id(value) -> str | None:
    if isinstance(value, Rule):
        return value.name
    if isinstance(value, bool):
        return "8bit" if value else "32bit"
    if isinstance(value, (str, int)):
        return str(value)
    return None  # tensors and None: not part of the id


def per_backend(argnames: str, **rows_by_kind):
    """``parametrize("backend_id,<argnames>")``: each backend runs the rows given for its kind
    (``cpu=``, ``cuda=``, ``emulated=``), else those given as ``all=``; rows are tuples (or one
    value). A kind given no rows runs nothing; the cuda-* rows skip, saying why, without a GPU."""
    names = [n for n in argnames.split(",") if n]
    params = []
    for backend_id in BACKEND_IDS:
        kind = backend_id.split("-")[0]
        for row in rows_by_kind.get(kind, rows_by_kind.get("all", ())):
            row = row if isinstance(row, tuple) else (row,)
            ident = "-".join(x for x in (backend_id, *map(_id, row)) if x is not None)
            params.append(pytest.param(backend_id, *row, id=ident, marks=_MARKS[kind]))
    return pytest.mark.parametrize(",".join(["backend_id", *names]), params)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Gradient/state magnitudes per rule: rules that square the gradient need magnitudes whose
# squares stay finite and normal-ish.
MAGNITUDES = {
    Rule.ADAM: (1e-15, 1e15), Rule.LAMB: (1e-15, 1e15), Rule.RMSPROP: (1e-15, 1e15), Rule.ADAGRAD: (1e-15, 1e15),
    Rule.SGD: (1e-30, 1e30), Rule.LARS: (1e-30, 1e30), Rule.LION: (1e-30, 1e30),
    Rule.ADEMAMIX: (1e-15, 1e15), Rule.RMSPROP_MOMENTUM: (1e-15, 1e15),
}


def scalars_for(rule: Rule, step: int, gen: torch.Generator) -> Scalars:
    """Realistic but varied per-step scalars (every field non-trivial for its rule)."""
    t = step + 1
    u = float(torch.rand((), generator=gen))
    grad_scale = 1.0 if step % 3 else 0.5 + u
    if rule in (Rule.ADAM, Rule.LAMB):
        b1, b2, lr, wd = 0.9, 0.999, 1e-3, 0.01
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        return Scalars.for_adam(
            lr=lr / bc1, beta1=b1, beta2=b2, eps=1e-8, grad_wd=0.01 if step % 2 else 0.0, decay=1 - lr * wd,
            bc1=bc1, bc2_sqrt=math.sqrt(bc2), grad_scale=grad_scale, update_wd=0.01 if rule == Rule.LAMB else 0.0,
        )
    if rule in (Rule.SGD, Rule.LARS):
        return Scalars.for_momentum(lr=0.01, momentum=0.9, dampening=0.1, weight_decay=1e-4, grad_scale=grad_scale)
    if rule == Rule.RMSPROP_MOMENTUM:
        return Scalars.for_rmsprop(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-4, momentum=0.9 if step % 4 else 0.0,
                                   grad_scale=grad_scale)
    if rule == Rule.RMSPROP:
        return Scalars.for_rmsprop(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=1e-4, grad_scale=grad_scale)
    if rule == Rule.ADAGRAD:
        return Scalars.for_adagrad(lr=0.01 / (1 + step * 0.01), eps=1e-10, weight_decay=1e-4, grad_scale=grad_scale)
    if rule == Rule.ADEMAMIX:  # the warm-up schedulers' values vary per step
        b1, b2, lr, wd = 0.9, 0.999, 1e-3, 0.01
        b3 = min(0.9999, 0.9 + 0.01 * t)
        return Scalars.for_ademamix(lr=lr, beta1=b1, beta2=b2, beta3=b3, alpha=min(5.0, 5.0 * t / 3) + u, eps=1e-8,
                                    bc1=1 - b1**t, bc2_sqrt=math.sqrt(1 - b2**t), decay=1 - lr * wd,
                                    grad_scale=grad_scale)
    if rule == Rule.LION:
        return Scalars.for_lion(lr=1e-4, beta1=0.9, beta2=0.99, decay=1 - 1e-5, grad_scale=grad_scale)
    raise AssertionError(rule)


def flags_for(rule: Rule, step: int, nesterov: bool) -> int:
    flags = 0
    if rule in (Rule.SGD, Rule.LARS) and step == 0:
        flags |= FLAG_FIRST_STEP
    if nesterov:
        flags |= FLAG_NESTEROV
    return flags


def qmaps(signs, map_name: str):
    """One map per state; ``"a+b"`` gives the first state map a and the others map b (a kernel call
    whose states use different maps: the CPU kernel runs such calls block by block)."""
    first, _, rest = map_name.partition("+")
    return [get_map(first if i == 0 or not rest else rest, signed) for i, signed in enumerate(signs)]


class Case:
    """Identical optimizer state held twice: for the reference and for the backend under test."""

    def __init__(self, rule, n, block_size, bits8, pdtype, gdtype, device, seed=0, magnitude=1.0,
                 zero_blocks=False, map_name="dynamic", grad_fn=None):
        self.rule, self.n, self.block_size, self.bits8 = Rule(rule), n, block_size, bits8
        self.pdtype, self.gdtype, self.device, self.magnitude = pdtype, gdtype, device, magnitude
        self.zero_blocks = zero_blocks
        self.grad_fn = grad_fn  # (gradient, step) -> gradient: non-finite and extreme cases
        self.gen = torch.Generator().manual_seed(seed)
        signs = RULE_STATES[self.rule]
        self.qmaps = qmaps(signs, map_name) if bits8 else [None] * len(signs)
        p = torch.randn(n, generator=self.gen) * 0.1
        if zero_blocks:  # parameter, gradient and state all zero: the block must stay all-zero
            p[: min(n, block_size)] = 0
        p = p.to(pdtype)
        self.ref = {"param": p.clone()}
        self.dut = {"param": p.clone().to(device)}
        for i, signed in enumerate(signs, start=1):
            s = torch.randn(n, generator=self.gen) * 1e-3 * magnitude
            if not signed:
                s = s * s
            if zero_blocks:
                s[: min(n, block_size)] = 0
            if bits8:
                codes, absmax = quantize_blockwise(s, self.qmaps[i - 1], block_size)
                self.ref[f"state{i}"], self.ref[f"absmax{i}"] = codes, absmax
                self.dut[f"state{i}"], self.dut[f"absmax{i}"] = codes.clone().to(device), absmax.clone().to(device)
            else:
                self.ref[f"state{i}"], self.ref[f"absmax{i}"] = s, None
                self.dut[f"state{i}"], self.dut[f"absmax{i}"] = s.clone().to(device), None
        self.ref["skipped"] = torch.zeros(1, dtype=torch.int64)  # blocks the kernel did not commit
        self.dut["skipped"] = torch.zeros(1, dtype=torch.int64, device=device)
        if self.rule in RULE_WRITES_UPDATE:
            self.ref["update_out"] = torch.zeros(n, dtype=torch.float32)
            self.dut["update_out"] = torch.zeros(n, dtype=torch.float32, device=device)

    def grad(self, step):
        g = torch.randn(self.n, generator=self.gen) * self.magnitude
        if self.zero_blocks:
            g[: min(self.n, self.block_size)] = 0
        if step % 5 == 4:
            g[:: 7] = 0
        if self.grad_fn is not None:
            g = self.grad_fn(g, step)
        return g.to(self.gdtype)

    def _call(self, backend, d, g, scalars, flags):
        q = self.qmaps + [None] * (2 - len(self.qmaps))
        three = {"state3": d["state3"], "absmax3": d["absmax3"]} if "state3" in d else {}
        backend.fused_update(
            self.rule, d["param"], g, d["state1"], d.get("state2"), d["absmax1"], d.get("absmax2"),
            q[0] if q[0] is None else q[0].to(d["state1"].device), q[1] if q[1] is None else q[1].to(d["state1"].device),
            scalars, flags, self.block_size, d.get("update_out"), d["skipped"], **three,
        )

    def step(self, backend, step, nesterov=False):
        g = self.grad(step)
        scalars = scalars_for(self.rule, step, self.gen)
        flags = flags_for(self.rule, step, nesterov)
        self._call(REFERENCE, self.ref, g, scalars, flags)
        self._call(backend, self.dut, g.to(self.device), scalars, flags)

    def assert_identical(self, where=""):
        for key, ref in self.ref.items():
            got = self.dut[key]
            if ref is None:
                assert got is None
                continue
            got = got.cpu()
            assert got.dtype == ref.dtype, f"{key}{where}: dtype {got.dtype} != {ref.dtype}"
            if not torch.equal(got, ref):
                if got.dtype == torch.uint8:
                    bad = (got != ref).nonzero().flatten()
                else:
                    bad = (got.view(-1).float() != ref.view(-1).float()).nonzero().flatten()
                i = int(bad[0])
                raise AssertionError(
                    f"{key}{where}: {bad.numel()} of {ref.numel()} differ, first at {i}: "
                    f"got {got.view(-1)[i].item()!r} expected {ref.view(-1)[i].item()!r}"
                )


def run_steps(backend, case: Case, steps: int, nesterov=False):
    case.assert_identical(" (initial)")
    for step in range(steps):
        case.step(backend, step, nesterov)
        case.assert_identical(f" after step {step + 1}")


def quantize_inputs(n: int, gen: torch.Generator):
    """Inputs that exercise every code boundary: map entries, midpoints and their float neighbours."""
    out = []
    for signed in (True, False):
        for make in (dynamic_map, linear_map, fp8_map):
            q = make(signed)
            mids = (q[:-1] + q[1:]) / 2
            pts = torch.cat([q, mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                             torch.nextafter(q, torch.tensor(2.0)), torch.nextafter(q, torch.tensor(-2.0))])
            pts = pts.clamp(-1, 1)
            # Put 1.0 at the start of every 64-block so the absmax is exactly 1 and values stay as constructed.
            pts = pts[torch.randperm(pts.numel(), generator=gen)]
            blocks = pts[: (pts.numel() // 63) * 63].view(-1, 63)
            x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
            out.append((f"boundaries-{make.__name__}-{signed}", x, q, 64))
    for signed in (True, False):  # fp8 maps: every binade, both signs, subnormal and huge inputs
        bits = torch.randint(0, 0x7F800000, (n,), generator=gen, dtype=torch.int64)
        bits = torch.where(torch.rand(n, generator=gen) < 0.5, bits, bits + 0x80000000 - (1 << 32))
        out.append((f"random-bits-fp8_map-{signed}", bits.to(torch.int32).view(torch.float32), fp8_map(signed), 64))
    q = dynamic_map(True)
    out.append(("randn", torch.randn(n, generator=gen), q, 256))
    out.append(("tiny", torch.randn(n, generator=gen) * 1e-30, q, 2048))
    out.append(("huge", torch.randn(n, generator=gen) * 1e30, q, 64))
    out.append(("subnormal", torch.randn(n, generator=gen) * 1e-40, q, 64))  # absmax below FLT_MIN: scale 1
    z = torch.randn(n, generator=gen)
    z[:512] = 0
    z[600:700] = -0.0
    out.append(("zeros", z, q, 256))
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    bits = torch.where(torch.isfinite(bits), bits, torch.zeros_like(bits))
    out.append(("random-bits", bits, q, 64))
    out.append(("random-bits-unsigned", bits.abs(), dynamic_map(False), 64))
    return out


# Rules the multi-tensor op takes (LAMB/LARS need their update direction back, one call each).
MULTI_RULES = [r for r in Rule if r not in RULE_WRITES_UPDATE]


def check_multi_equals_single(backend, rule: Rule, bits8: bool, device: str) -> None:
    """fused_update_multi over many tensors is bitwise the single-tensor op on each, for 3 steps.

    Sizes and dtypes vary per tensor; 30 extra small tensors cross the CUDA launch's
    24-tensor chunks; block size 8192 takes the CUDA path without shared-memory state.
    """
    # (the emulated CUDA kernels run every thread as a fiber: their large tensors are smaller, still
    # more blocks than the emulated grid has warps, so the persistent warp kernel strides; and a tensor
    # of several 8192-value blocks ending in a partial one)
    emulated = backend.name == "cuda-emulated"
    large, several = (12_001, 4096 * 2 + 7) if emulated else (70_001, 4096 * 5 + 7)
    sizes = [(1, torch.float32), (255, torch.bfloat16), (256, torch.float32), (1000, torch.float16),
             (large, torch.float32), (3, torch.bfloat16), (several, torch.float32)]
    sizes += [(64 * (i % 5) + i + 1, (torch.float32, torch.bfloat16)[i % 2]) for i in range(30)]
    gen = torch.Generator().manual_seed(21)
    for block_size in (64, 8192):
        rows_multi, rows_single = [], []
        for n, dtype in sizes:
            case = Case(rule, n, block_size, bits8, dtype, dtype, device,
                        seed=int(torch.randint(0, 1000, (1,), generator=gen)))
            d = case.dut
            rows_multi.append((d["param"], case.grad(0).to(device), d["state1"], d.get("state2"), d["absmax1"],
                               d.get("absmax2")) + ((d["state3"], d["absmax3"]) if "state3" in d else ()))
            rows_single.append(tuple(None if t is None else t.clone() for t in rows_multi[-1]))
            q = [None if m is None else m.to(device) for m in case.qmaps + [None] * (2 - len(case.qmaps))]
        for step in range(3):
            scalars = scalars_for(rule, step, torch.Generator().manual_seed(step))
            flags = flags_for(rule, step, False)
            backend.fused_update_multi(rule, rows_multi, q[0], q[1], scalars, flags, block_size)
            for row in rows_single:
                extra = dict(state3=row[6], absmax3=row[7]) if len(row) > 6 else {}
                backend.fused_update(rule, *row[:6], q[0], q[1], scalars, flags, block_size, **extra)
            for (n, _), multi, single in zip(sizes, rows_multi, rows_single):
                for name, a, b in zip(("param", "grad", "state1", "state2", "absmax1", "absmax2", "state3", "absmax3"),
                                      multi, single):
                    if a is not None:
                        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (
                            f"{name} of the {n}-value tensor, block size {block_size}, step {step + 1}")


def check_all_finite_many(backend, device: str) -> None:
    """One pass over many tensors: a flag per tensor, any dtype, empty tensors, inf/NaN anywhere;
    100 extra tensors cross the CUDA launch's 64-tensor chunks."""
    specs = [(0, torch.float32), (70_000, torch.float32), (5, torch.bfloat16), (200_001, torch.float16),
             (65_536, torch.float32), (3, torch.float64), (2_000_003, torch.float32)]
    xs = [torch.randn(n).to(dt).to(device) for n, dt in specs]
    assert backend.all_finite_many(xs) == [True] * len(xs)
    xs[1][-1] = float("nan")
    xs[3][100_000] = float("inf")
    xs[5][0] = float("-inf")
    xs[6][1_999_999] = float("nan")  # far into a tensor the CUDA check strides over
    assert backend.all_finite_many(xs) == [True, False, True, False, True, False, False]
    assert backend.all_finite_many([xs[2]]) == [True]
    many = [torch.randn(100 + i, device=device) for i in range(100)]
    for i in (0, 63, 64, 99):
        many[i][i] = float("inf")
    assert backend.all_finite_many(many) == [i not in (0, 63, 64, 99) for i in range(100)]


# Optimizer classes run end to end on another backend and compared with the CPU kernels.
OPTIMIZER_CASES = {
    "AdamW8bit": ("AdamW8bit", dict(lr=1e-2, weight_decay=0.1, min_8bit_size=256)),
    "LAMB8bit": ("LAMB8bit", dict(lr=1e-2, min_8bit_size=256)),
    "LARS8bit": ("LARS8bit", dict(lr=1e-2, momentum=0.9, min_8bit_size=256)),
    "Lion8bit": ("Lion8bit", dict(lr=1e-3, min_8bit_size=256)),
    "AdEMAMix8bit": ("AdEMAMix8bit", dict(lr=1e-2, t_alpha=4, t_beta3=4, min_8bit_size=256)),
}


def optimizer_run(name: str, device: str):
    """30 parameters of mixed sizes, 6 steps: one NaN (that parameter skipped), then two under GradScaler."""
    import dist8

    cls_name, kw = OPTIMIZER_CASES[name]
    gen = torch.Generator().manual_seed(0)
    shapes = [(64 * (i % 7) + 5 * i + 1,) for i in range(28)] + [(300, 70), (5000,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    opt = getattr(dist8, cls_name)(params, **kw)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    scaler.scale(torch.ones((), device=device))  # initialises the scale
    for step in range(6):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen).to(device)
            if step == 2 and i == 3:
                p.grad.view(-1)[0] = float("nan")  # this parameter's step is skipped, state untouched
        if step < 4:
            opt.step()
        else:
            for p in params:
                p.grad.mul_(scaler.get_scale())
            scaler.step(opt)
            scaler.update()
    return [p.detach().cpu() for p in params], opt


def assert_same_runs(name: str, got, opt, ref, ref_opt, exact: bool = True) -> None:
    """Two optimizer_run results agree: skips, parameters and state bitwise. ``exact=False``
    lets LAMB/LARS parameters differ by float64 summation order (and skips their states,
    which follow those parameters)."""
    trust = name in ("LAMB8bit", "LARS8bit")
    assert opt.nonfinite_skips == ref_opt.nonfinite_skips == 1
    for i, (a, b) in enumerate(zip(got, ref)):
        if trust and not exact:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name} parameter {i}")
        else:
            assert torch.equal(a, b), f"{name} parameter {i}"
    if trust and not exact:
        return
    for pa, pb in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        for key, value in ref_opt.state[pb].items():
            other = opt.state[pa][key]
            assert (torch.equal(other.cpu(), value) if torch.is_tensor(value) else other == value), f"{name} {key}"


def check_optimizer_matches_cpu(name: str, device: str) -> None:
    got, opt = optimizer_run(name, device)
    assert_same_runs(name, got, opt, *optimizer_run(name, "cpu"), exact=False)


def check_quantize_matches_reference(backend, name, x, q, bs, device: str) -> None:
    """quantize_blockwise / dequantize_blockwise on ``device``: bitwise the reference."""
    codes, absmax = backend.quantize_blockwise(x.to(device), q.to(device), bs)
    rc, ra = quantize_blockwise(x, q, bs)
    assert torch.equal(absmax.cpu(), ra), name
    mism = (codes.cpu() != rc).nonzero().flatten()
    assert mism.numel() == 0, f"{name}: {mism.numel()} codes differ, e.g. x={x[mism[0]].item()!r}"
    deq = backend.dequantize_blockwise(codes, absmax, q.to(device), bs)
    assert torch.equal(deq.cpu(), dequantize_blockwise(rc, ra, q, bs)), name


def _set(g, index, value):
    g = g.clone()
    g[index] = value
    return g


# Gradients with inf/NaN where blocks meet and in the last (partial) block, and finite extremes
# whose squares overflow (3e38, 1e19 * randn) or underflow (subnormals): (gradient, step) -> gradient.
EXTREME_GRADS = {
    "inf-at-block-edges": lambda g, s: _set(_set(g, 63, float("inf")), 64, float("-inf")) if s == 1 else g,
    "nan-in-last-partial-block": lambda g, s: _set(g, -1, float("nan")) if s != 0 else g,
    "nan-everywhere-once": lambda g, s: torch.full_like(g, float("nan")) if s == 1 else g,
    "finite-3e38": lambda g, s: _set(g, 70, 3e38 if s % 2 else -3e38),
    "finite-1e19": lambda g, s: g * 1e19,
    "subnormal": lambda g, s: g * 1e-40,
    "mixed-magnitudes": lambda g, s: torch.where(torch.arange(g.numel()) % 2 == 0, g * 1e19, g * 1e-30),
}


def check_extreme_gradients(backend, device: str, rules=tuple(Rule), sizes=((300, 64), (1000, 256))) -> None:
    """Every rule, 8- and 32-bit state: bitwise the reference (skip counts included) on
    EXTREME_GRADS, and no state, absmax or parameter ever becomes non-finite."""
    for rule in rules:
        for bits8 in (True, False):
            for name, fn in EXTREME_GRADS.items():
                for n, bs in sizes:
                    case = Case(rule, n, bs, bits8, torch.float32, torch.float32, device, seed=5, grad_fn=fn)
                    for step in range(3):
                        case.step(backend, step)
                        where = f" ({rule.name}, {'8' if bits8 else '32'}-bit, {name}, n={n}, step {step + 1})"
                        case.assert_identical(where)
                        for key, t in case.ref.items():
                            if t is not None and t.dtype.is_floating_point:
                                assert torch.isfinite(t).all(), f"{key} not finite{where}"
                        for i, q in enumerate(case.qmaps, start=1):
                            if q is not None:
                                deq = dequantize_blockwise(case.ref[f"state{i}"], case.ref[f"absmax{i}"], q, bs)
                                assert torch.isfinite(deq).all(), f"state{i} not finite{where}"
