"""Optimizer step time: dist8 AdamW8bit vs torch AdamW (foreach, fused), bitsandbytes and torchao AdamW8bit.

Median of >= 10 timed steps after warm-up, candidates interleaved round by round
in one process, in a new (seeded) order each round: in a fixed order each candidate always ran
right after the same one (dist8's default after torchao's 2-second step at 64M), and on a 2-core
VM such a run read torch's fused 64M step at 58 ms against 43 ms in shuffled and quiet runs, and
dist8's at 58 against 46-48 (BENCHMARKS.md section 19). Reports ms/step, effective GB/s (bytes the step must move:
param read+write, grad read, state read+write) and the ratio of that to the
memory-bandwidth bound measured here with a large copy.

    python bench/step.py --device cpu --sizes 1M,16M --out bench/results/step-$(hostname).json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402


def _cpu_isa() -> str:
    """The vector extensions the CPU kernels can use here (they are built with -march=native)."""
    try:
        flags = set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vbmi", "f16c") if f in flags)


def _code_paths(device) -> dict:
    """The code paths actually used: dist8's CPU build (DIST8_CPU_FLAGS can restrict it, e.g.
    "-mno-avx512f" for the AVX2 path) and torch's (ATEN_CPU_CAPABILITY=avx2 restricts it)."""
    out = {"torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if device.type == "cpu":
        try:
            from dist8.kernels import native

            native.load_backend("cpu")
            out["dist8_cpu_path"] = torch.ops.dist8_cpu_info.features()
        except Exception as exc:  # noqa: BLE001 - reported, the rows say the rest
            out["dist8_cpu_path"] = f"unavailable: {exc}"
    return out


def _load_average() -> str:
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def _cpu_features(device) -> str:
    """What the native CPU build says it does (``dist8 info``); '' on CUDA or without a native build."""
    if device.type != "cpu":
        return ""
    try:
        from dist8.kernels import native

        native.load_backend("cpu")
        return torch.ops.dist8_cpu_info.features()
    except Exception:  # noqa: BLE001 - no native build: no variant rows
        return ""


def _other_lookup_mode(device) -> str:
    """'hw' or 'scalar': the AVX2/AVX-512 CPU path's table-lookup mode that is not this CPU's default
    (DIST8_CPU_GATHER); '' where there is no choice (portable, CUDA)."""
    features = _cpu_features(device)
    if not features.startswith(("avx2", "avx512")):
        return ""
    return "hw" if "scalar-load lookups" in features else "scalar"


def _other_code_mode(device) -> str:
    """'table' or 'runs': how the AVX-512 CPU path finds the dynamic map's codes when not as this
    CPU's default does (DIST8_CPU_CODES); '' where there is no choice (AVX2, portable, CUDA)."""
    features = _cpu_features(device)
    if not features.startswith("avx512"):
        return ""
    return "table" if "codes of linear-run maps computed" in features else "runs"


# GPT-2 small (124M parameters in 148 tensors): what a real model hands the optimizer --
# many tensors of mixed sizes, so per-tensor overhead and the largest tensor matter.
GPT2_SMALL = [(50257, 768), (1024, 768)] + 12 * [
    (768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,), (768, 3072), (768,)
] + [(768,), (768,)]
MODELS = {"GPT2": GPT2_SMALL}


def parse_size(s: str) -> int:
    s = s.strip().upper()
    if s in MODELS:
        return sum(math.prod(shape) for shape in MODELS[s])
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
    return int(float(s[:-1] if s[-1] in "KMG" else s) * mult)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, n=1 << 26) -> float:
    """GB/s of a large device copy (read + write), the bytes-moved bound."""
    a = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    sync(device)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * a.numel() * 4 / min(ts) / 1e9


def make_params(size_label, n, dtype, device, seed=0):
    """One tensor of n values, or the tensors of a model (``--sizes gpt2``)."""
    shapes = MODELS.get(size_label.strip().upper(), [(n,)])
    return [make_param(shape, dtype, device, seed + i) for i, shape in enumerate(shapes)]


def make_param(shape, dtype, device, seed=0):
    # drawn where they live: 256M values drawn on the CPU would cost a GPU lease seconds per candidate
    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.nn.Parameter((torch.randn(shape, generator=g, device=device) * 0.02).to(dtype=dtype))
    p.grad = (torch.randn(shape, generator=g, device=device) * 1e-3).to(dtype=dtype)
    return p


def candidates(n, dtype, device, which, size_label=""):
    """name -> (step callable, bytes moved per step)."""
    model = size_label.strip().upper() in MODELS
    es = torch.tensor([], dtype=dtype).element_size()
    bytes8 = n * (2 * es + es + 2 * 2)  # param r/w, grad r, 2 uint8 states r/w (absmax negligible)
    bytes32 = n * (2 * es + es + 2 * 2 * es)  # torch keeps the states in the param dtype
    out = {}

    def add(name, factory, nbytes):
        if which and not any(w in name for w in which):
            return
        try:
            out[name] = (factory(), nbytes, None)
        except Exception as exc:  # noqa: BLE001 - record and go on
            out[name] = (None, nbytes, f"{type(exc).__name__}: {exc}".splitlines()[0][:200])

    def dist8_kernel(quant_map="dynamic"):
        from dist8.kernels import get_backend
        from dist8.kernels.rules import Rule, Scalars
        from dist8.quant import get_map

        backend = get_backend(device)
        if backend.name == "reference":
            raise RuntimeError("native kernels unavailable (reference backend)")
        p = make_param((n,), dtype, device)
        bs = 256
        nb = (n + bs - 1) // bs
        s1 = torch.zeros(n, dtype=torch.uint8, device=device)
        s2 = torch.zeros(n, dtype=torch.uint8, device=device)
        q1, q2 = get_map(quant_map, True).to(device), get_map(quant_map, False).to(device)
        s1.fill_(int(torch.searchsorted(q1, torch.tensor(0.0, device=device))))
        s2.fill_(int(torch.searchsorted(q2, torch.tensor(0.0, device=device))))
        a1 = torch.zeros(nb, device=device)
        a2 = torch.zeros(nb, device=device)
        state = {"t": 0}

        def step():
            state["t"] += 1
            t = state["t"]
            bc1, bc2 = 1 - 0.9**t, 1 - 0.999**t
            c = Scalars.for_adam(lr=1e-3 / bc1, beta1=0.9, beta2=0.999, eps=1e-8, decay=1 - 1e-3 * 1e-2,
                                 bc2_sqrt=math.sqrt(bc2))
            backend.fused_update(Rule.ADAM, p.data, p.grad, s1, s2, a1, a2, q1, q2, c, 0, bs)

        return step

    def dist8_optim(on_nonfinite="skip", master_weight_bits=None, quant_map="dynamic", amp_unscale="kernel"):
        def factory():
            import dist8.optim

            params = make_params(size_label, n, dtype, device)
            opt = dist8.optim.AdamW8bit(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                                        block_size=256, min_8bit_size=4096, on_nonfinite=on_nonfinite,
                                        master_weight_bits=master_weight_bits, quant_map=quant_map,
                                        amp_unscale=amp_unscale)
            return opt.step
        return factory

    def flashoptim(master_weight_bits):
        """FlashOptim's FlashAdamW (Triton, GPU only): 8-bit companded states (+ its 8-bit correction)."""
        def factory():
            from flashoptim import FlashAdamW

            opt = FlashAdamW(make_params(size_label, n, dtype, device), lr=1e-3, weight_decay=1e-2,
                             master_weight_bits=master_weight_bits)
            opt.step()  # fail here rather than in the timed loop
            return opt.step
        return factory

    def torch_adamw(**kw):
        def factory():
            opt = torch.optim.AdamW(make_params(size_label, n, dtype, device), lr=1e-3, **kw)
            return opt.step
        return factory

    def cuda_variant(factory, variant):
        """The step with DIST8_CUDA_KERNEL=variant (read by the CUDA ops at each call)."""
        def make():
            import os

            inner = factory()

            def step():
                os.environ["DIST8_CUDA_KERNEL"] = variant
                try:
                    inner()
                finally:
                    os.environ.pop("DIST8_CUDA_KERNEL", None)
            return step
        return make

    def env_variant(factory, key, value):
        """The step with os.environ[key] = value during each call (read by the ops at each call)."""
        def make():
            import os

            inner = factory()

            def step():
                old = os.environ.get(key)
                os.environ[key] = value
                try:
                    inner()
                finally:
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
            return step
        return make

    def with_grad_scaler(factory, init_scale=2.0**10):
        """scaler.step + update around an optimizer (fp16 mixed precision): the scaler checks
        the gradients for inf/NaN; a fused optimizer unscales inside its kernel, any other is
        handed gradients the scaler unscaled in place (``init_scale=1.0`` there: the same pass,
        without shrinking the gradients step after step into subnormals)."""
        def make():
            opt = factory().__self__
            scaler = torch.amp.GradScaler(device.type, init_scale=init_scale)
            scaler.scale(torch.ones((), device=device))  # initialises the scale

            def step():
                scaler.step(opt)
                scaler.update()
            return step
        return make

    def bnb():
        import bitsandbytes as bnb_mod

        opt = bnb_mod.optim.AdamW8bit(make_params(size_label, n, dtype, device), lr=1e-3, min_8bit_size=4096)
        opt.step()  # fail here rather than in the timed loop
        return opt.step

    def torchao():
        from torchao.optim import AdamW8bit

        p = make_param((n,), dtype, device)
        opt = AdamW8bit([p], lr=1e-3, block_size=256)
        opt.step()
        return opt.step

    if not model:  # the bare kernel on one tensor
        add("dist8 kernel AdamW8bit", dist8_kernel, bytes8)
        add('dist8 kernel AdamW8bit quant_map="fp8"', lambda: dist8_kernel("fp8"), bytes8)
    if device.type == "cuda":  # the warp-per-block CUDA kernels, side by side (DIST8_CUDA_KERNEL=warp)
        if not model:
            add("dist8 kernel AdamW8bit warp", cuda_variant(dist8_kernel, "warp"), bytes8)
        add("dist8.optim.AdamW8bit warp", cuda_variant(dist8_optim(), "warp"), bytes8)
    # The default: inf/NaN (and overflowing) blocks skipped inside the kernel, no extra read.
    add("dist8.optim.AdamW8bit", dist8_optim(), bytes8)
    # The whole-parameter contract: one more read of every gradient before the update.
    add("dist8.optim.AdamW8bit skip_param", dist8_optim("skip_param"), bytes8)
    # The AVX2 build's other table-lookup mode (hardware gathers vs scalar loads; the default
    # depends on the CPU vendor, docs/design.md "Kernels"), side by side with the default.
    other = _other_lookup_mode(device)
    if other:
        add(f"dist8.optim.AdamW8bit DIST8_CPU_GATHER={other}", env_variant(dist8_optim(), "DIST8_CPU_GATHER", other),
            bytes8)
    # The AVX-512 build's other way to the dynamic map's codes (computed from its linear runs or
    # looked up in the key table; the default depends on the CPU, docs/design.md "Kernels").
    other = _other_code_mode(device)
    if other:
        add(f"dist8.optim.AdamW8bit DIST8_CPU_CODES={other}", env_variant(dist8_optim(), "DIST8_CPU_CODES", other),
            bytes8)
    # The fp8 map: codes computed from the float bits on AVX2 CPUs instead of four table lookups
    # per value (a different state format: docs/design.md "The fp8 map").
    add('dist8.optim.AdamW8bit quant_map="fp8"', dist8_optim(quant_map="fp8"), bytes8)
    add("torch AdamW fused", torch_adamw(fused=True), bytes32)
    # Under torch.amp.GradScaler both check the gradients once (the scaler) and unscale in-kernel.
    # (GradScaler is fp16's tool; torch's CUDA unscale refuses bf16 gradients.)
    if not (device.type == "cuda" and dtype == torch.bfloat16):
        add("dist8.optim.AdamW8bit +GradScaler", with_grad_scaler(dist8_optim()), bytes8)
        # amp_unscale="scaler": the scaler's unscale_ pass instead of its check pass, step() as unfused
        add('dist8.optim.AdamW8bit +GradScaler amp_unscale="scaler"',
            with_grad_scaler(dist8_optim(amp_unscale="scaler"), init_scale=1.0), bytes8)
        add("torch AdamW fused +GradScaler", with_grad_scaler(torch_adamw(fused=True)), bytes32)
    add("torch AdamW foreach", torch_adamw(foreach=True), bytes32)
    add("bitsandbytes AdamW8bit", bnb, bytes8)
    # 24-bit master weights for 16-bit params: bf16 param + int8 correction (read and written)
    master, suffix, master_bytes = (24, " master_weight_bits=24", 2 * n) if dtype != torch.float32 else (None, "", 0)
    if master:
        add("dist8.optim.AdamW8bit" + suffix, dist8_optim(master_weight_bits=master), bytes8 + master_bytes)
    if device.type == "cuda":
        add("FlashOptim FlashAdamW" + suffix, flashoptim(master), bytes8 + master_bytes)
    if not model:  # torchao compiles a step per tensor shape on the CPU: minutes for a model
        add("torchao AdamW8bit", torchao, bytes8)
    return out


def _time_candidates(cands: dict, args, device, bw: float, n: int, size_s: str, dtype_name: str) -> list[dict]:
    """Warm up and time ``cands`` (one size and dtype), round by round in a shuffled order; one row each.
    A function of its own so that the candidates (their tensors: gigabytes at 64M) are all dropped when it
    returns, before the next size's are built."""
    live = {k: v for k, v in cands.items() if v[0] is not None}
    for name, (fn, _, err) in list(live.items()):
        try:
            for _ in range(args.warmup):
                fn()
            sync(device)
        except Exception as exc:  # noqa: BLE001
            cands[name] = (None, cands[name][1], f"{type(exc).__name__}: {exc}".splitlines()[0][:200])
            live.pop(name)
    times = {k: [] for k in live}
    order = list(live.items())
    shuffle = random.Random(0).shuffle  # the same orders in every run
    for _ in range(args.reps):
        shuffle(order)
        for name, (fn, _, _) in order:
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    rows = []
    for name, (fn, nbytes, err) in cands.items():
        row = {"size": n, "size_label": size_s, "dtype": dtype_name, "optimizer": name, "bytes": nbytes}
        if name in times:
            med = statistics.median(times[name])
            row.update(ms=med * 1e3, ms_min=min(times[name]) * 1e3, gbps=nbytes / med / 1e9,
                       bound_ratio=(nbytes / med / 1e9) / bw, reps=len(times[name]))
        else:
            row.update(error=err or "not run")
        rows.append(row)
    return rows


def run(args):
    device = torch.device(args.device)
    bw = copy_bandwidth(device)
    results = []
    print(f"device={device} threads={torch.get_num_threads()} copy bandwidth={bw:.1f} GB/s", flush=True)
    for size_s in args.sizes.split(","):
        n = parse_size(size_s)
        for dtype_name in args.dtypes.split(","):
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
            results += _time_candidates(candidates(n, dtype, device, [w for w in args.only.split(",") if w], size_s),
                                        args, device, bw, n, size_s, dtype_name)
    return bw, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="1M,16M", help="comma list, e.g. 1M,16M,64M,256M; gpt2 = the 148 tensors of GPT-2 small")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", default="", help="comma list of substrings of optimizer names to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"step-{socket.gethostname()}.json"))
    args = ap.parse_args(argv)
    args.reps = max(args.reps, 10)
    load_before = _load_average()
    bw, results = run(args)
    print(f"\n{'size':>6} {'dtype':>5}  {'optimizer':<34} {'ms/step':>9} {'GB/s':>7} {'of bound':>8}")
    for r in results:
        if "ms" in r:
            print(f"{r['size_label']:>6} {r['dtype']:>5}  {r['optimizer']:<34} {r['ms']:9.3f} {r['gbps']:7.1f} "
                  f"{r['bound_ratio']:8.2f}")
        else:
            print(f"{r['size_label']:>6} {r['dtype']:>5}  {r['optimizer']:<34} {'FAILED':>9}  {r['error'][:70]}")
    meta = dict(machine(), device=str(args.device), copy_bandwidth_gbps=bw, time=time.strftime("%Y-%m-%dT%H:%M:%S"),
                # 1-minute load average before and after the run: a shared machine's other work slows the
                # compute-bound rows more than the memory-bound ones, so ratios from a loaded run mislead
                load_average=f"{load_before} -> {_load_average()}",
                isa=_cpu_isa(), **_code_paths(torch.device(args.device)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
