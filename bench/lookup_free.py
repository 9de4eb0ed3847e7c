"""What would a *lookup-free* 8-bit state code cost on this CPU? A measured prototype.

dist8's CPU AdamW8bit reads and writes its two 8-bit states through 256-entry tables (the
dynamic map to dequantize, a key table to quantize): four table lookups per value, ~1.3 core
cycles each on AMD Zen 3 (bench/NOTES.md, section 7). This script builds a prototype Adam/AdamW
kernel (bench/lookup_free_kernel.cpp, compiled at run time into ~/.cache, AVX2 intrinsics)
whose codes are computed from float bits (FP8-like) instead, and times it against dist8's own
kernel and torch's fused fp32 AdamW, interleaved round by round in one process. It also
measures the code's numerical quality against dist8's dynamic map (pure torch, cheap).

The format (a format change: not bitsandbytes-compatible), block size 256, one float32 absmax
per block and state, as dist8:

* m (signed): sign + e4m3 magnitude with subnormals, largest code exactly 1.0 (y = m / absmax
  in [-1, 1]): 16 binades of 8 mantissa steps (normals 2^-14 .. 1, subnormals k * 2^-17), max
  relative rounding error 1/16 for normals. 7 of the 128 magnitudes (1.125 .. 1.875) are never
  produced; kept so that the grid is plain FP8 bits. e4m3 rather than e5m2: m's useful range
  within a block is a few decades (its values enter the update linearly, and tiny |m| next to
  a large block max hardly matter), so a third mantissa bit buys more than a 17th-32nd binade;
  the quality section reports e5m2 and e3m4 too.
* v (non-negative): unsigned e5m3 with subnormals, largest code exactly 1.0: 32 binades
  (normals 2^-30 .. 1, subnormals k * 2^-33). v is a squared quantity, so its in-block range is
  the square of the gradients' (10^5 in |g| is 10^10 in v): it needs the exponent bits m does
  not, and the sign bit is free for it. Only sqrt(v) enters the update, so 3 mantissa bits on v
  are ~4 bits on sqrt(v) (max relative error 1/32 in the denominator): the same precision and
  range as FlashOptim-style companding (e4m4 of sqrt(v / absmax)), without a sqrt or a square
  in the coding. The quality section reports e4m4-of-sqrt(v) for comparison.
* Rounding: to the nearest code, ties to the even code, computed from the float bits of |y|
  (integer round-to-nearest-even of the dropped mantissa bits; cvtps_epi32 of |y| * 2^17 or 2^33
  below the smallest normal). The script checks it against a brute-force nearest search.
* v floor (as dist8, dist8/kernels/rules.py): a v code 0 reads back as half the smallest
  positive code value times absmax (2^-34 * absmax), so a nonzero m never meets a zero v.

Timed next to the kernel: its phases compiled out one at a time (no dequantization, no
quantization, no divider work: wrong results, for attributing the time), the first version's
select-based decoding, and a "fast encode" variant that folds 2^-112 / 2^-96 into the block
reciprocal so the product is the code's own float32 (fewer ops; differs from the exact nearest
code only by double rounding in the subnormal-code range, checked against its own reference).

Kernel semantics otherwise mirror dist8's CPU kernel: dist8's Adam rule op for op (fp32, no FMA:
1 sqrt + 2 divisions), y = x * fl(1 / absmax) (dist8's block_reciprocal), per-block commit
(a block whose new m, v or p is non-finite keeps its old values), at::parallel_for over blocks
with a grain of 128 blocks. Before timing, the kernel (AVX2 and its scalar path, 1 and 2
threads) is checked bit for bit against a pure-torch reference of the same step.

    python bench/lookup_free.py                         # 256K,16M x 1,2 threads x 3 passes, ~1.5 min + build
    python bench/lookup_free.py --sizes 16M --threads 2 --reps 20
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNEL_SRC = HERE / "lookup_free_kernel.cpp"
DEFAULT_OUT = HERE / "results" / "lookup-free-vm-epyc.json"
BS = 256

# The two codes (see the module docstring and the C++ source): normal code k has float bits
# (k + off) << 20; below the smallest normal (float bits minnorm), k = round(|y| * 2^sub_exp).
CODES = {
    "m": dict(off=896, minnorm=0x38800000, sub_exp=17, kmax=127, signed=True),   # e4m3, sign bit
    "v": dict(off=768, minnorm=0x30800000, sub_exp=33, kmax=255, signed=False),  # e5m3, unsigned
}
V_FLOOR_FRAC = 2.0**-34  # half the smallest positive v code

# Timing variants of the lookup-free kernel (bit mask, compiled out; results wrong on purpose).
PHASES = {
    "lookup-free select-decode": 8,  # not a phase: the first version's decoding (same results)
    "lookup-free fast-encode": 16,  # not a phase: the leaner encoding (see the C++ source)
    "lookup-free -dequant": 1,
    "lookup-free -quant": 2,
    "lookup-free -dequant -quant": 3,
    "lookup-free -divider": 4,
    "lookup-free -dequant -quant -divider": 7,
}

LR, BETA1, BETA2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 1e-2


def parse_size(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------
def load_kernel(verbose: bool = False) -> str:
    """Compile (once per source version) and load the kernel; returns its features string."""
    import torch
    from torch.utils import cpp_extension

    flags = ["-O3", "-march=native", "-fno-fast-math", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
    digest = hashlib.sha256(KERNEL_SRC.read_bytes() + " ".join(flags).encode() + torch.__version__.encode())
    name = f"lookup_free_{digest.hexdigest()[:12]}"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dist8-bench" / name
    cache.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    print(f"building/loading {KERNEL_SRC.name} in {cache} ...", flush=True)
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the op runs on one thread.
    cpp_extension.load(name=name, sources=[str(KERNEL_SRC)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                       build_directory=str(cache), is_python_module=False, verbose=verbose)
    print(f"  ready in {time.perf_counter() - tic:.0f} s", flush=True)
    return torch.ops.lookup_free.features()


# ---------------------------------------------------------------------------------------------
# Pure-torch reference of the code and of the step (bit-exact target of the kernel)
# ---------------------------------------------------------------------------------------------
def _f32(x):
    import torch

    return torch.tensor(x, dtype=torch.float32)


def ref_encode(y, which: str):
    """uint8 codes of float32 y (already normalised), as the kernel computes them."""
    import torch

    c = CODES[which]
    bits = y.contiguous().view(torch.int32).long()
    a = bits & 0x7FFFFFFF
    kn = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - c["off"]
    ks = torch.round(a.to(torch.int32).view(torch.float32) * _f32(2.0 ** c["sub_exp"])).long()  # half to even
    k = torch.where(a < c["minnorm"], ks, kn).clamp(max=c["kmax"])
    if c["signed"]:
        k = k | ((bits >> 24) & 0x80)
    return k.to(torch.uint8)


FAST_SCALE = {"m": 2.0**-112, "v": 2.0**-96}  # variant 16: folded into the block reciprocal


def ref_encode_fast(t, which: str):
    """Variant 16's encoding of t = x * (fl(1 / absmax) * 2^-112 or 2^-96): integer round to
    nearest even of the 20 low bits of t's float bits (t is already the code's float32)."""
    import torch

    bits = t.contiguous().view(torch.int32).long()
    a = bits & 0x7FFFFFFF
    k = (a + 0x7FFFF + ((a >> 20) & 1)) >> 20
    if CODES[which]["signed"]:
        k = k | ((bits >> 24) & 0x80)
    return k.to(torch.uint8)


def ref_decode(codes, which: str):
    """float32 value (relative to absmax) of each code."""
    import torch

    c = CODES[which]
    k = codes.long()
    mag = k & 127 if c["signed"] else k
    normal = ((mag + c["off"]) << 20).to(torch.int32).view(torch.float32)
    sub = mag.to(torch.float32) * _f32(2.0 ** -c["sub_exp"])
    v = torch.where(mag < 8, sub, normal)
    if c["signed"]:
        v = torch.where((k & 128) != 0, -v, v)
    return v


def _sqrt(x):
    """IEEE float32 sqrt (torch's vectorised CPU sqrt is not always correctly rounded; dist8's
    reference does the same)."""
    import torch

    return torch.sqrt(x.double()).float()


def ref_scalars(lr, beta1, beta2, eps, wd, bc1, bc2_sqrt):
    """The float32 scalars the kernel (and dist8's Scalars.for_adam) uses."""
    return dict(lr=_f32(lr / bc1), b1=_f32(beta1), omb1=_f32(1.0 - beta1), b2=_f32(beta2), omb2=_f32(1.0 - beta2),
                eps=_f32(eps), decay=_f32(1.0 - lr * wd), bc2=_f32(bc2_sqrt), gs=_f32(1.0), gwd=_f32(0.0))


def ref_read_states(mc, vc, ma, va):
    """Dequantized m and v ([blocks, 256] float32), v with the floor."""
    import torch

    m = ref_decode(mc, "m").view(-1, BS) * ma[:, None]
    v = ref_decode(vc, "v").view(-1, BS) * va[:, None]
    floor = (_f32(V_FLOOR_FRAC) * va)[:, None]
    return m, torch.where(v < floor, floor, v)


def block_reciprocal(absmax):
    import torch

    ok = absmax >= torch.finfo(torch.float32).tiny
    return torch.where(ok, 1.0 / torch.where(ok, absmax, torch.ones_like(absmax)), torch.ones_like(absmax))


def _quantize(x, absmax, which, fast):
    import torch

    r = block_reciprocal(absmax)
    exact = ref_encode(x * r[:, None], which).view(-1, BS)
    if not fast:
        return exact
    rf = r * _f32(FAST_SCALE[which])
    ok = rf >= torch.finfo(torch.float32).tiny
    return torch.where(ok[:, None], ref_encode_fast(x * rf[:, None], which).view(-1, BS), exact)


def ref_adam_(p, g, mc, vc, ma, va, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt, fast=False) -> int:
    """The kernel's step in plain torch, in place; returns the number of skipped blocks.
    ``fast``: variant 16's encoding."""
    import torch

    s = ref_scalars(lr, beta1, beta2, eps, wd, bc1, bc2_sqrt)
    P, G = p.view(-1, BS), g.view(-1, BS)
    m, v = ref_read_states(mc, vc, ma, va)
    g2 = G * s["gs"]
    g2 = g2 + s["gwd"] * P
    m = s["b1"] * m + s["omb1"] * g2
    v = s["b2"] * v + s["omb2"] * (g2 * g2)
    denom = _sqrt(v) / s["bc2"] + s["eps"]
    pn = P * s["decay"]
    pn = pn - s["lr"] * (m / denom)
    ok = torch.isfinite(m).all(1) & torch.isfinite(v).all(1) & torch.isfinite(pn).all(1)
    nm, nv = m.abs().amax(1), v.abs().amax(1)
    cm, cv = _quantize(m, nm, "m", fast), _quantize(v, nv, "v", fast)
    P.copy_(torch.where(ok[:, None], pn, P))
    mc.view(-1, BS).copy_(torch.where(ok[:, None], cm, mc.view(-1, BS)))
    vc.view(-1, BS).copy_(torch.where(ok[:, None], cv, vc.view(-1, BS)))
    ma.copy_(torch.where(ok, nm, ma))
    va.copy_(torch.where(ok, nv, va))
    return int((~ok).sum())


def kernel_adam_(p, g, mc, vc, ma, va, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt, variant=0, simd=True) -> int:
    import torch

    return torch.ops.lookup_free.adam_(p, g, mc, vc, ma, va, lr, beta1, beta2, eps, wd, bc1, bc2_sqrt, variant, simd)


# ---------------------------------------------------------------------------------------------
# Correctness: kernel vs reference, bit for bit
# ---------------------------------------------------------------------------------------------
def _grid(which: str):
    """All 256 code values as float64, sorted, with their codes (for the brute-force nearest check)."""
    import torch

    codes = torch.arange(256, dtype=torch.uint8)
    vals = ref_decode(codes, which).double()
    order = torch.argsort(vals, stable=True)
    return vals[order], codes[order]


def brute_nearest(y, which: str):
    """Nearest code by value in float64, ties to the even code, -0 for negatives rounding to 0."""
    import torch

    vals, codes = _grid(which)
    if CODES[which]["signed"]:  # drop -0 (code 128) from the grid: +0 and -0 are the same value
        keep = codes != 128
        vals, codes = vals[keep], codes[keep]
    yd = y.double()
    hi = torch.searchsorted(vals, yd).clamp(max=vals.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    dl, dh = (yd - vals[lo]).abs(), (vals[hi] - yd).abs()
    pick_lo = (dl < dh) | ((dl == dh) & (codes[lo].long() % 2 == 0))
    k = torch.where(pick_lo, codes[lo], codes[hi]).long()
    if CODES[which]["signed"]:
        k = torch.where((k == 0) & (torch.signbit(y)), torch.full_like(k, 128), k)
    return k.to(torch.uint8)


def check_correctness() -> dict:
    import torch

    out = {}
    gen = torch.Generator().manual_seed(123)
    for which in ("m", "v"):
        signed = CODES[which]["signed"]
        codes = torch.arange(256, dtype=torch.uint8)
        vals = ref_decode(codes, which)
        for simd in (True, False):
            assert torch.equal(torch.ops.lookup_free.decode(codes, signed, simd).view(torch.int32),
                               vals.view(torch.int32)), f"decode {which} simd={simd}"
        # inputs: every code value, exact midpoints between neighbours (ties) and their float
        # neighbours, log-uniform magnitudes over 2^-45 .. 1.2 with both signs, float32 subnormals, zeros
        sv, _ = _grid(which)
        sv = sv[torch.isfinite(sv)].unique()
        mids = ((sv[1:] + sv[:-1]) / 2).float()
        mag = torch.exp2(torch.rand(200_000, generator=gen) * 45.3 - 45.0)
        rnd = mag * torch.where(torch.rand(200_000, generator=gen) < 0.5, -1.0, 1.0) if signed else mag
        sub = torch.tensor([1e-45, 1e-40, 1e-38, 0.0, -0.0 if signed else 0.0])
        ys = torch.cat([vals, mids, torch.nextafter(mids, torch.tensor(math.inf)),
                        torch.nextafter(mids, torch.tensor(-math.inf)), rnd.float(), sub])
        if not signed:
            ys = ys.abs()
        ref = ref_encode(ys, which)
        for simd in (True, False):
            got = torch.ops.lookup_free.encode(ys.contiguous(), signed, simd)
            assert torch.equal(got, ref), f"encode {which} simd={simd}: {(got != ref).sum()} differ"
        inrange = ys.abs() <= 1.0
        near = brute_nearest(ys[inrange], which)
        assert torch.equal(near, ref[inrange]), f"{which}: not the nearest code at {(near != ref[inrange]).sum()}"
        assert torch.equal(ref_encode(vals[vals.abs() <= 1.875], which), codes[vals.abs() <= 1.875])
        out[f"{which}_code_values_checked"] = int(ys.numel())
        # variant 16's encoding on the same values: where does it differ from the exact nearest code?
        fast = ref_encode_fast(ys[inrange] * _f32(FAST_SCALE[which]), which)
        diff = fast != ref[inrange]
        small = ys[inrange].abs() < 2.0 ** (-14 if signed else -30)
        assert not (diff & ~small).any(), f"{which}: fast encoding differs in the normal range"
        out[f"{which}_fast_encode_differs"] = f"{int(diff.sum())} of {int(inrange.sum())} values (all in the subnormal-code range)"

    # whole steps: AVX2 and scalar paths, 1 and 2 threads, vs the torch reference
    n = BS * 300
    g0 = torch.Generator().manual_seed(7)
    p0 = torch.randn(n, generator=g0) * 0.02
    grads = []
    for t in range(6):
        gr = torch.randn(n, generator=g0) * torch.exp(torch.randn(n, generator=g0) * 3) * 1e-3  # wide range
        gr.view(-1, BS)[3] = 0.0                     # an all-zero block
        gr.view(-1, BS)[5] *= 1e-30                  # tiny block (subnormal-ish values)
        gr.view(-1, BS)[6, :200] = 0.0               # mostly zero block: v codes 0 next to m codes
        gr.view(-1, BS)[7] *= torch.where(torch.rand(BS, generator=g0) < 0.5, 1e-6, 1.0)  # two scales
        if t == 2:
            gr.view(-1, BS)[9, 17] = math.nan        # a skipped block
            gr.view(-1, BS)[10, 3] = math.inf
        if t == 4:
            gr.view(-1, BS)[11, 0] = 3e38            # g * g overflows: skipped
        grads.append(gr)
    runs = {}
    configs = [("reference", None, 1), ("avx2 1 thread", True, 1), ("avx2 2 threads", True, 2),
               ("scalar 1 thread", False, 1), ("scalar 2 threads", False, 2), ("avx2 select-decode", True, 1),
               ("fast reference", None, 1), ("avx2 fast-encode 1 thread", True, 1), ("avx2 fast-encode 2 threads", True, 2)]
    threads0 = torch.get_num_threads()
    for label, simd, threads in configs:
        torch.set_num_threads(threads)
        p = p0.clone()
        mc, vc = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
        ma, va = torch.zeros(n // BS), torch.zeros(n // BS)
        skipped = 0
        for t, gr in enumerate(grads, 1):
            bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
            args = (p, gr, mc, vc, ma, va, LR, BETA1, BETA2, EPS, WD, bc1, math.sqrt(bc2))
            variant = 8 if "select" in label else 16 if "fast" in label else 0
            skipped += (ref_adam_(*args, fast="fast" in label) if simd is None
                        else kernel_adam_(*args, variant=variant, simd=simd))
        runs[label] = (p, mc, vc, ma, va, skipped)
    torch.set_num_threads(threads0)
    ref = runs["reference"]
    assert ref[5] == 3, f"reference skipped {ref[5]} blocks, expected 3"
    fast_ref = runs["fast reference"]
    for label, r in runs.items():
        if "fast" in label:
            for a, b, what in zip(r[:5], fast_ref[:5], ("p", "m codes", "v codes", "m absmax", "v absmax")):
                assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{label}: {what} differs (fast reference)"
            continue
        for a, b, what in zip(r[:5], ref[:5], ("p", "m codes", "v codes", "m absmax", "v absmax")):
            ok = torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            assert ok, f"{label}: {what} differs from the torch reference"
        assert r[5] == ref[5], f"{label}: skipped {r[5]} blocks, reference {ref[5]}"
    used_sub = bool(((ref[1] & 127) < 8).any() and ((ref[1] & 127) > 0).any()) and bool(((ref[2] > 0) & (ref[2] < 8)).any())
    out.update(step_check="bit-identical to the torch reference (p, codes, absmax, skipped blocks) after 6 steps; "
               + ", ".join(k for k in runs if "reference" not in k),
               fast_encode_vs_exact_after_6_steps={
                   "m codes differing": int((fast_ref[1] != ref[1]).sum()),
                   "v codes differing": int((fast_ref[2] != ref[2]).sum()), "of": n}, blocks=n // BS, skipped_blocks=ref[5],
               subnormal_codes_exercised=used_sub)
    print(f"correctness: codes bit-exact and nearest; steps bit-identical ({', '.join(runs)}); "
          f"{ref[5]} blocks skipped as expected; subnormal codes exercised: {used_sub}", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def subnormal_decode_check(n=1 << 18, reps=100) -> dict:
    """Minimum ns/value of decoding all-subnormal vs all-normal codes (the decoding multiplies
    float32 subnormals for the subnormal codes: a CPU with denormal-operand assists would show it)."""
    import torch

    out = {}
    gen = torch.Generator().manual_seed(5)
    for which, signed in (("m", True), ("v", False)):
        for name, lo, hi in (("subnormal codes", 1, 8), ("normal codes", 64, 72)):
            c = torch.randint(lo, hi, (n,), dtype=torch.uint8, generator=gen)
            if signed:
                c |= (torch.rand(n, generator=gen) < 0.5).to(torch.uint8) * 128
            for _ in range(5):
                torch.ops.lookup_free.decode(c, signed, True)
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.ops.lookup_free.decode(c, signed, True)
                ts.append(time.perf_counter() - t0)
            out[f"{which} {name}"] = min(ts) / n * 1e9
    return out


def _param(n, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 0.02, torch.randn(n, generator=g) * 1e-3


def lookup_free_step(n, variant=0):
    import torch

    p, g = _param(n)
    mc, vc = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    ma, va = torch.zeros(n // BS), torch.zeros(n // BS)
    state = {"t": 0, "skipped": 0}
    op = torch.ops.lookup_free.adam_

    def step():
        state["t"] += 1
        t = state["t"]
        bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
        state["skipped"] += op(p, g, mc, vc, ma, va, LR, BETA1, BETA2, EPS, WD, bc1, math.sqrt(bc2), variant, True)
    step.state = state
    return step


def dist8_step(n):
    """bench/step.py's dist8_kernel: the bare fused_update of dist8's CPU backend."""
    import torch
    from dist8.kernels import get_backend
    from dist8.kernels.rules import Rule, Scalars
    from dist8.quant import dynamic_map

    backend = get_backend(torch.device("cpu"))
    if backend.name == "reference":
        raise RuntimeError("dist8 native CPU kernels unavailable (reference backend)")
    p, g = _param(n)
    nb = (n + BS - 1) // BS
    q1, q2 = dynamic_map(True), dynamic_map(False)
    s1 = torch.full((n,), int(torch.searchsorted(q1, torch.tensor(0.0))), dtype=torch.uint8)
    s2 = torch.full((n,), int(torch.searchsorted(q2, torch.tensor(0.0))), dtype=torch.uint8)
    a1, a2 = torch.zeros(nb), torch.zeros(nb)
    state = {"t": 0}

    def step():
        state["t"] += 1
        t = state["t"]
        bc1, bc2 = 1 - BETA1**t, 1 - BETA2**t
        c = Scalars.for_adam(lr=LR / bc1, beta1=BETA1, beta2=BETA2, eps=EPS, decay=1 - LR * WD, bc2_sqrt=math.sqrt(bc2))
        backend.fused_update(Rule.ADAM, p, g, s1, s2, a1, a2, q1, q2, c, 0, BS)
    return step


def torch_fused_step(n):
    import torch

    p, g = _param(n)
    p = torch.nn.Parameter(p)
    p.grad = g
    return torch.optim.AdamW([p], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD, fused=True).step


def torch_fused_bare_step(n):
    """torch._fused_adamw_ itself (the kernel torch.optim.AdamW(fused=True) calls), without the
    optimizer's Python (~tens of us per step: visible at 256K values)."""
    import torch

    p, g = _param(n)
    m, v = torch.zeros(n), torch.zeros(n)
    st = torch.zeros(())

    def step():
        st.add_(1)
        torch._fused_adamw_([p], [g], [m], [v], [], [st], lr=LR, beta1=BETA1, beta2=BETA2, weight_decay=WD, eps=EPS,
                            amsgrad=False, maximize=False)
    return step


MAIN = ("lookup-free", "lookup-free fast-encode", "dist8", "torch fused", "torch _fused_adamw_ bare")


def time_all(sizes, threads_list, reps, small_reps, warmup, phases, passes):
    """Per size: every candidate built once; then ``passes`` times, per thread count, warm-up and
    ``reps`` rounds in which each candidate runs once (interleaved). One row per pass."""
    import torch

    rows = []
    for size in sizes:
        n = parse_size(size)
        assert n % BS == 0, f"size {size} must be a multiple of {BS}"
        cands = {"lookup-free": lookup_free_step(n), "dist8": dist8_step(n), "torch fused": torch_fused_step(n),
                 "torch _fused_adamw_ bare": torch_fused_bare_step(n)}
        cands.update({k: lookup_free_step(n, v) for k, v in PHASES.items() if phases or k in MAIN})
        r = reps if n >= (4 << 20) else small_reps
        for pass_ in range(passes):
            for threads in threads_list:
                torch.set_num_threads(threads)
                for fn in cands.values():
                    for _ in range(warmup):
                        fn()
                times = {k: [] for k in cands}
                load0 = os.getloadavg()
                for _ in range(r):
                    for k, fn in cands.items():
                        t0 = time.perf_counter()
                        fn()
                        times[k].append(time.perf_counter() - t0)
                load1 = os.getloadavg()
                med = {k: statistics.median(v) for k, v in times.items()}
                ref, bare = med["torch fused"], med["torch _fused_adamw_ bare"]
                row = dict(size=size, n=n, threads=threads, reps=r, pass_=pass_,
                           load_average_1min=f"{load0[0]:.2f} -> {load1[0]:.2f}",
                           median_ms={k: v * 1e3 for k, v in med.items()},
                           ns_per_value={k: v / n * 1e9 for k, v in med.items()},
                           ns_per_value_min={k: min(v) / n * 1e9 for k, v in times.items()},
                           ratio_vs_torch_fused={k: v / ref for k, v in med.items()},
                           ratio_vs_torch_bare={k: v / bare for k, v in med.items()},
                           # per round: t / t(torch fused) of the same round; median over rounds
                           paired_ratio_vs_torch_fused={k: statistics.median(
                               a / b for a, b in zip(v, times["torch fused"])) for k, v in times.items()},
                           raw_ms={k: [round(x * 1e3, 4) for x in v] for k, v in times.items()})
                rows.append(row)
                print(f"  pass {pass_ + 1} {size:>5} x {threads} threads: " + ", ".join(
                      f"{k} {row['ns_per_value'][k]:.2f}" for k in MAIN) + " ns/value "
                      f"(load {row['load_average_1min']})", flush=True)
        skipped = {k: fn.state["skipped"] for k, fn in cands.items() if hasattr(fn, "state")}
        assert not any(skipped[k] for k in MAIN if k in skipped), f"lookup-free blocks skipped while timing: {skipped}"
        del cands
    return rows


def summarize(rows):
    """One entry per (size, threads): medians over passes of each pass's median, and the spread."""
    out = []
    keys = sorted({(r["n"], r["size"], r["threads"]) for r in rows})
    for n, size, threads in keys:
        rs = [r for r in rows if r["size"] == size and r["threads"] == threads]
        cands = rs[0]["ns_per_value"].keys()

        def med(f, rs=rs, cands=cands):
            return {k: statistics.median(f(r)[k] for r in rs) for k in cands}

        out.append(dict(size=size, n=n, threads=threads, passes=len(rs), reps_per_pass=rs[0]["reps"],
                        ns_per_value=med(lambda r: r["ns_per_value"]),
                        ns_per_value_min={k: min(r["ns_per_value_min"][k] for r in rs) for k in cands},
                        ratio_vs_torch_fused=med(lambda r: r["ratio_vs_torch_fused"]),
                        ratio_vs_torch_fused_range={k: [min(r["ratio_vs_torch_fused"][k] for r in rs),
                                                        max(r["ratio_vs_torch_fused"][k] for r in rs)] for k in cands},
                        paired_ratio_vs_torch_fused=med(lambda r: r["paired_ratio_vs_torch_fused"]),
                        ratio_vs_torch_bare=med(lambda r: r["ratio_vs_torch_bare"]),
                        load_average_1min=[r["load_average_1min"] for r in rs]))
    return out


# ---------------------------------------------------------------------------------------------
# Quality (pure torch)
# ---------------------------------------------------------------------------------------------
def grid_values(ebits: int, mbits: int):
    """Non-negative values of an e{ebits}m{mbits} grid with subnormals whose largest code is 1.0."""
    import torch

    nb = 2**ebits - 1  # binades of normals: 2^-(nb-1) .. 1 ; top binade holds only 1.0
    sub = torch.arange(0, 2**mbits, dtype=torch.float64) * 2.0 ** (-(nb - 1) - mbits)
    normals = [2.0**e * (1 + f / 2**mbits) for e in range(-(nb - 1), 1) for f in range(2**mbits)]
    vals = torch.cat([sub, torch.tensor(normals, dtype=torch.float64)])
    return vals[vals <= 1.0].unique()


def grid_roundtrip(y, ebits, mbits, signed):
    """Round-trip of normalised float32 y through the grid (nearest, float64), for alternatives."""
    import torch

    vals = grid_values(ebits, mbits)
    a = y.double().abs()
    hi = torch.searchsorted(vals, a).clamp(max=vals.numel() - 1)
    lo = (hi - 1).clamp(min=0)
    q = torch.where((a - vals[lo]).abs() <= (vals[hi] - a).abs(), vals[lo], vals[hi])
    return (torch.where(y < 0, -q, q) if signed else q).float()


def _blocks_norm(x):
    am = x.view(-1, BS).abs().amax(1)
    return x.view(-1, BS) * block_reciprocal(am)[:, None], am


def roundtrip(x, how: str):
    """x (flat float32) quantized and dequantized block-wise by one code; no floor."""
    import torch

    signed = bool((x < 0).any())
    if how == "dist8 dynamic map":
        from dist8.quant import dequantize_blockwise, dynamic_map, quantize_blockwise

        q = dynamic_map(signed)
        codes, am = quantize_blockwise(x, q, BS)
        return dequantize_blockwise(codes, am, q, BS)
    y, am = _blocks_norm(x)
    if how == "lookup-free (chosen)":
        which = "m" if signed else "v"
        return (ref_decode(ref_encode(y.reshape(-1), which), which).view(-1, BS) * am[:, None]).reshape(-1)
    if how.startswith("sqrt e"):  # companded: the grid holds sqrt(v / absmax)
        e, mb = int(how[6]), int(how[8])
        s = grid_roundtrip(torch.sqrt(y), e, mb, False)
        return ((s * s) * am[:, None]).reshape(-1)
    e, mb = int(how[1]), int(how[3])
    return (grid_roundtrip(y, e, mb, signed) * am[:, None]).reshape(-1)


def err_stats(x, xh):
    import torch

    nz = x != 0
    rel = (xh[nz].double() - x[nz].double()).abs() / x[nz].double().abs()
    q = torch.quantile(rel[torch.randperm(rel.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.tensor([0.5, 0.95, 0.99], dtype=torch.float64))
    return dict(mean=float(rel.mean()), p50=float(q[0]), p95=float(q[1]), p99=float(q[2]),
                flushed_to_zero=float(((xh[nz] == 0).double().mean())),
                norm_rel=float((xh - x).double().norm() / x.double().norm()))


def quality(n=65536, steps=100, seed=0) -> dict:
    """Round-trip error on Adam states of a 100-step fp32 AdamW run with heavy-tailed, partly
    sparse gradients, and the parameter error after 100 steps of each 8-bit Adam vs fp32."""
    import torch
    from dist8.kernels import get_backend
    from dist8.kernels.rules import Rule, Scalars
    from dist8.quant import dynamic_map

    rows_, cols = n // 1024, 1024
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(n, generator=gen) * 0.02
    curv = torch.exp2(torch.rand(n, generator=gen) * 8 - 4)                      # 1/16 .. 16
    row_scale = (10.0 ** (torch.rand(rows_, generator=gen) * 3 - 3)).repeat_interleave(cols)  # 1e-3 .. 1
    noise_gen = torch.Generator().manual_seed(seed + 1)
    noises = []
    for _ in range(steps):  # Student-t (3 dof) noise, rows absent from the batch with probability 0.2
        z = torch.randn(n, generator=noise_gen)
        chi = torch.randn(n, 3, generator=noise_gen).pow(2).sum(1) / 3         # chi^2(3)/3 -> t with 3 dof
        present = (torch.rand(rows_, generator=noise_gen) >= 0.2).float().repeat_interleave(cols)
        noises.append((z / chi.sqrt() * row_scale * 1e-2, present))

    def grad(p, i):
        noise, present = noises[i]
        return (curv * (p - target) * row_scale * 1e-2 + noise) * present

    def loss(p):
        return float((0.5 * curv * (p - target) ** 2).sum())

    p0 = torch.zeros(n)
    # fp32 torch AdamW: the states to quantize, and the parameter baseline
    p32 = torch.nn.Parameter(p0.clone())
    opt = torch.optim.AdamW([p32], lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WD)
    for i in range(steps):
        p32.grad = grad(p32.detach(), i)
        opt.step()
    st = opt.state[p32]
    m, v = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
    bc2 = 1 - BETA2**steps
    out = {"setup": f"{n} values ({rows_} rows of {cols}), {steps} steps of fp32 torch AdamW on a noisy quadratic "
                    "(curvature 2^U(-4,4)); gradient noise Student-t(3) with per-row scale 10^U(-3,0); each row absent "
                    "(zero gradient) with probability 0.2; m and v taken after the last step, block 256",
           "in_block_dynamic_range": {
               "m_p50_of_block_max_over_min_nonzero": float(_range(m).median()),
               "v_p50_of_block_max_over_min_nonzero": float(_range(v).median())}}
    out["m_roundtrip"] = {h: err_stats(m, roundtrip(m, h)) for h in
                          ("dist8 dynamic map", "lookup-free (chosen)", "e5m2", "e3m4")}
    out["v_roundtrip"] = {h: err_stats(v, roundtrip(v, h)) for h in
                          ("dist8 dynamic map", "lookup-free (chosen)", "sqrt e4m4", "e4m4")}
    # update direction m / (sqrt(v) / sqrt(bc2) + eps) with both states read back (v with each code's floor)
    u = m / (torch.sqrt(v) / math.sqrt(bc2) + EPS)
    dm, dv = dynamic_map(True), dynamic_map(False)
    from dist8.kernels.rules import floor_state, state_floor_fraction

    v_d8 = floor_state(roundtrip(v, "dist8 dynamic map"), v.view(-1, BS).abs().amax(1), state_floor_fraction(dv), BS)
    v_lf = roundtrip(v, "lookup-free (chosen)")
    av = v.view(-1, BS).abs().amax(1).repeat_interleave(BS)
    v_lf = torch.where(v_lf < V_FLOOR_FRAC * av, V_FLOOR_FRAC * av, v_lf)
    out["update_direction"] = {}
    for name, mh, vh in (("dist8 dynamic map", roundtrip(m, "dist8 dynamic map"), v_d8),
                         ("lookup-free (chosen)", roundtrip(m, "lookup-free (chosen)"), v_lf)):
        uh = mh / (torch.sqrt(vh) / math.sqrt(bc2) + EPS)
        out["update_direction"][name] = err_stats(u, uh)

    # 100 steps of each 8-bit Adam from the same start, same gradient noise (the gradient depends on p)
    backend = get_backend(torch.device("cpu"))
    pd = p0.clone()
    s1 = torch.full((n,), int(torch.searchsorted(dm, torch.tensor(0.0))), dtype=torch.uint8)
    s2 = torch.full((n,), int(torch.searchsorted(dv, torch.tensor(0.0))), dtype=torch.uint8)
    a1, a2 = torch.zeros(n // BS), torch.zeros(n // BS)
    pl = p0.clone()
    mc, vc = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    ma, va = torch.zeros(n // BS), torch.zeros(n // BS)
    for i in range(steps):
        t = i + 1
        b1, b2 = 1 - BETA1**t, 1 - BETA2**t
        c = Scalars.for_adam(lr=LR / b1, beta1=BETA1, beta2=BETA2, eps=EPS, decay=1 - LR * WD, bc2_sqrt=math.sqrt(b2))
        backend.fused_update(Rule.ADAM, pd, grad(pd, i), s1, s2, a1, a2, dm, dv, c, 0, BS)
        ref_adam_(pl, grad(pl, i), mc, vc, ma, va, LR, BETA1, BETA2, EPS, WD, b1, math.sqrt(b2))
    p32 = p32.detach()
    moved = (p32 - p0).norm()
    out["params_after_100_steps"] = {
        "fp32_loss": loss(p32), "start_loss": loss(p0),
        "dist8 dynamic map": {"rel_param_error": float((pd - p32).norm() / moved), "loss": loss(pd)},
        "lookup-free (chosen)": {"rel_param_error": float((pl - p32).norm() / moved), "loss": loss(pl)},
        "note": "rel_param_error = ||p_8bit - p_fp32|| / ||p_fp32 - p_0||; the lookup-free run is the torch "
                "reference (bit-identical to the kernel)"}
    return out


def _range(x):
    import torch

    b = x.view(-1, BS).abs()
    mn = torch.where(b > 0, b, torch.full_like(b, math.inf)).amin(1)
    r = b.amax(1) / mn
    return r[torch.isfinite(r)]


# ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
    import platform

    import torch

    cpu, flags = platform.processor(), set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and cpu in ("", platform.processor()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                isa=" ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512vbmi") if f in flags),
                date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    try:  # which dist8 kernel was timed: the working tree's csrc/ (built by dist8's own loader)
        import subprocess

        def git(*a):
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True,
                                  check=False).stdout.strip()

        info["dist8_git_head"] = git("rev-parse", "HEAD")
        info["dist8_csrc_uncommitted_changes"] = git("status", "--porcelain", "--", "csrc").splitlines()
    except OSError:
        pass
    try:
        from dist8.kernels import native

        native.load_backend("cpu")
        info["dist8_cpu_path"] = torch.ops.dist8_cpu_info.features()
    except Exception as exc:  # noqa: BLE001
        info["dist8_cpu_path"] = f"unavailable: {exc}"
    return info


def print_tables(summary, quality_out):
    print("\nns/value: median over passes of each pass's median [minimum of all calls]")
    names = [("LF", "lookup-free"), ("LF fast-enc", "lookup-free fast-encode"), ("dist8", "dist8"),
             ("torch fused", "torch fused"), ("fused bare", "torch _fused_adamw_ bare")]
    hdr = f"{'size':>5} {'thr':>3} | " + " ".join(f"{a:>13}" for a, _ in names)
    print(hdr)
    print("-" * len(hdr))
    for r in summary:
        ns, mn = r["ns_per_value"], r["ns_per_value_min"]
        print(f"{r['size']:>5} {r['threads']:>3} | " + " ".join(f"{ns[k]:6.2f} [{mn[k]:4.2f}]" for _, k in names))
    print("\nratios to torch.optim.AdamW(fused=True): median over passes [range over passes] (paired: median of "
          "per-round ratios); LF/bare: to torch._fused_adamw_ called directly")
    hdr = (f"{'size':>5} {'thr':>3} | {'LF/torch':>18} {'paired':>6} | {'LF fast-enc/torch':>18} | "
           f"{'dist8/torch':>18} | {'LF/bare':>7} {'d8/LF':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in summary:
        rt, rg, pr = r["ratio_vs_torch_fused"], r["ratio_vs_torch_fused_range"], r["paired_ratio_vs_torch_fused"]

        def cell(k, rt=rt, rg=rg):
            return f"{rt[k]:5.2f} [{rg[k][0]:4.2f}-{rg[k][1]:4.2f}]"

        print(f"{r['size']:>5} {r['threads']:>3} | {cell('lookup-free'):>18} {pr['lookup-free']:6.2f} | "
              f"{cell('lookup-free fast-encode'):>18} | {cell('dist8'):>18} | "
              f"{r['ratio_vs_torch_bare']['lookup-free']:7.2f} "
              f"{r['ns_per_value']['dist8'] / r['ns_per_value']['lookup-free']:6.2f}")
    if any(k in summary[0]["ns_per_value"] for k in PHASES if k not in MAIN):
        print("\nlookup-free variants / phases compiled out (ns/value, median over passes; saved vs full kernel)")
        for r in summary:
            ns = r["ns_per_value"]
            full = ns["lookup-free"]
            parts = ", ".join(f"{k.replace('lookup-free ', '')} {ns[k]:.2f} ({full - ns[k]:+.2f})" for k in PHASES)
            print(f"{r['size']:>5} x {r['threads']}: full {full:.2f}; {parts}")
    if quality_out:
        print("\nround-trip relative error on Adam states (nonzero elements): mean / p95 / p99 / flushed to 0")
        for st in ("m_roundtrip", "v_roundtrip", "update_direction"):
            for k, e in quality_out[st].items():
                print(f"  {st:<16} {k:<22} {e['mean']:.4f} / {e['p95']:.4f} / {e['p99']:.4f} / "
                      f"{e['flushed_to_zero']:.5f}  (norm {e['norm_rel']:.4f})")
        pa = quality_out["params_after_100_steps"]
        print("  params after 100 steps: ||p8 - p32|| / ||p32 - p0||: "
              f"dist8 {pa['dist8 dynamic map']['rel_param_error']:.4f}, lookup-free {pa['lookup-free (chosen)']['rel_param_error']:.4f}; loss fp32 {pa['fp32_loss']:.6g}, "
              f"dist8 {pa['dist8 dynamic map']['loss']:.6g}, lookup-free {pa['lookup-free (chosen)']['loss']:.6g} "
              f"(start {pa['start_loss']:.6g})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256K,16M", help="comma list of value counts (multiples of 256), e.g. 256K,16M")
    ap.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    ap.add_argument("--reps", type=int, default=30, help="timed rounds for sizes >= 4M values (at least 10)")
    ap.add_argument("--small-reps", type=int, default=200, help="timed rounds for sizes < 4M values")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3, help="repeat the whole timing (all sizes x threads) this often")
    ap.add_argument("--no-phases", action="store_true", help="skip the compiled-out-phase variants")
    ap.add_argument("--no-quality", action="store_true", help="skip the numerical-quality section")
    ap.add_argument("--verbose-build", action="store_true")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    args = ap.parse_args(argv)
    args.reps, args.small_reps, args.passes = max(args.reps, 10), max(args.small_reps, 10), max(args.passes, 1)

    import torch  # after argparse: --help needs neither torch nor a compiler

    sys.path.insert(0, str(ROOT))
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    features = load_kernel(args.verbose_build)
    assert features == "avx2", f"the kernel was built without AVX2 ({features}); timings would not mean much"
    correctness = check_correctness()
    info = machine_info()  # also builds/loads dist8's CPU kernels before any timing
    quality_out = None if args.no_quality else quality()
    torch.set_num_threads(1)
    subnormal = subnormal_decode_check()
    print("decode op, min ns/value (1 thread): " + ", ".join(f"{k} {v:.3f}" for k, v in subnormal.items()), flush=True)
    print("timing (interleaved round by round) ...", flush=True)
    rows = time_all(args.sizes.split(","), [int(t) for t in args.threads.split(",")], args.reps, args.small_reps,
                    args.warmup, not args.no_phases, args.passes)
    load_after = os.getloadavg()
    summary = summarize(rows)
    print_tables(summary, quality_out)
    meta = dict(info, load_average_before=list(load_before), load_average_after=list(load_after),
                kernel=str(KERNEL_SRC.relative_to(ROOT)), kernel_features=features,
                compile_flags="-O3 -march=native -fno-fast-math -ffp-contract=off -fno-math-errno -fopenmp",
                lr=LR, betas=[BETA1, BETA2], eps=EPS, weight_decay=WD, block_size=BS,
                runtime_s=round(time.perf_counter() - t_start, 1), argv=sys.argv[1:])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "correctness": correctness, "quality": quality_out,
                               "subnormal_decode_ns_per_value_min": subnormal, "timing_summary": summary,
                               "timing": rows},
                              indent=1))
    print(f"\nload average {load_before[0]:.2f} -> {load_after[0]:.2f}; {meta['runtime_s']} s; wrote {out}")


if __name__ == "__main__":
    main()
