"""The CPU AVX2 path's two table-lookup modes side by side: bare fused Adam kernel calls.

dist8's AVX2 kernels load table entries (the code table in quantization, the map in
dequantization) either with hardware gathers or with scalar loads (DIST8_CPU_GATHER=hw|scalar,
read at each call; see docs/design.md, "Kernels"). This times bare ``fused_update`` calls (Adam,
two 8-bit states, block 256) in each mode and torch's fused AdamW, interleaved round by round in
one process: median and minimum ns per value, and the median ratio to torch fused. The minimum of
a small, cache-resident size with one thread is the kernel's compute cost with the least
interference from other work on a shared machine.

    python bench/cpu_lookups.py --sizes 256K,16M --threads 1,2
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402
from step import parse_size  # noqa: E402


def kernel_step(n: int, mode: str):
    """One Adam step of the bare kernel on n values with DIST8_CPU_GATHER=mode."""
    from dist8.kernels import get_backend
    from dist8.kernels.rules import Rule, Scalars
    from dist8.quant import dynamic_map

    backend = get_backend(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    p = torch.randn(n, generator=g) * 0.02
    grad = torch.randn(n, generator=g) * 1e-3
    bs = 256
    q1, q2 = dynamic_map(True), dynamic_map(False)
    s1 = torch.full((n,), int(torch.searchsorted(q1, torch.tensor(0.0))), dtype=torch.uint8)
    s2 = torch.full((n,), int(torch.searchsorted(q2, torch.tensor(0.0))), dtype=torch.uint8)
    a1, a2 = torch.zeros((n + bs - 1) // bs), torch.zeros((n + bs - 1) // bs)
    state = {"t": 0}

    def step():
        os.environ["DIST8_CPU_GATHER"] = mode
        try:
            state["t"] = min(state["t"] + 1, 100)
            t = state["t"]
            c = Scalars(lr=1e-3 / (1 - 0.9**t), beta1=0.9, one_minus_beta1=0.1, beta2=0.999,
                        one_minus_beta2=1 - 0.999, eps=1e-8, decay=1 - 1e-5, bc2_sqrt=math.sqrt(1 - 0.999**t))
            backend.fused_update(Rule.ADAM, p, grad, s1, s2, a1, a2, q1, q2, c, 0, bs)
        finally:
            os.environ.pop("DIST8_CPU_GATHER", None)
    return step


def torch_fused_step(n: int):
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(n, generator=g) * 0.02)
    p.grad = torch.randn(n, generator=g) * 1e-3
    return torch.optim.AdamW([p], lr=1e-3, fused=True).step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="256K,16M")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=0, help="rounds (default: ~2 s of work per candidate, 10..400)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if old := os.environ.get("DIST8_CPU_GATHER"):
        sys.exit(f"unset DIST8_CPU_GATHER (set to {old!r}): this benchmark sets it per call")
    from dist8.kernels import native

    native.load_backend("cpu")
    path = torch.ops.dist8_cpu_info.features()
    if not path.startswith("avx2"):
        print(f"note: this build is not the AVX2 path ({path}); DIST8_CPU_GATHER changes nothing here")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for size in args.sizes.split(","):
            n = parse_size(size)
            cands = {"dist8 kernel hw": kernel_step(n, "hw"), "dist8 kernel scalar": kernel_step(n, "scalar"),
                     "torch AdamW fused": torch_fused_step(n)}
            for fn in cands.values():
                for _ in range(3):
                    fn()
            reps = args.reps or max(10, min(400, int(2e9 / (n * 4 * len(cands)) + 1)))
            times = {k: [] for k in cands}
            load = os.getloadavg()[0]
            for _ in range(reps):
                for k, fn in cands.items():
                    t0 = time.perf_counter()
                    fn()
                    times[k].append(time.perf_counter() - t0)
            ref = statistics.median(times["torch AdamW fused"])
            for k, v in times.items():
                med = statistics.median(v)
                rows.append({"threads": threads, "size": size, "candidate": k, "ns_per_value_median": med / n * 1e9,
                             "ns_per_value_min": min(v) / n * 1e9, "x_torch_fused": med / ref, "reps": reps,
                             "load_average": f"{load:.1f} -> {os.getloadavg()[0]:.1f}"})
    print(f"dist8 CPU path: {path}")
    print_table(rows, ["threads", "size", "candidate", "ns_per_value_median", "ns_per_value_min", "x_torch_fused",
                       "reps", "load_average"])
    out = write_json("cpu-lookups", {"meta": dict(machine(), dist8_cpu_path=path), "rows": rows}, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
