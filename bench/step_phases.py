"""What the CPU step would cost without its 8-bit conversions: ablation builds vs torch fused AdamW.

Issue 15's CPU line asks the default AdamW8bit step to take <= 1.0x torch's fused fp32 AdamW. This
measures how much of the step the conversions are: the CPU kernels are rebuilt with
``DIST8_CPU_FLAGS=-DDIST8_ABLATE_ENCODE`` (codes not computed: the pipeline stores a byte of each
scaled value instead) and/or ``-DDIST8_ABLATE_DECODE`` (states not dequantized: the rule reads the
previous block's values), benchmark-only builds whose results are wrong (`dist8 info` says
"ABLATED"; a normal build never compiles them). Everything else -- traffic, the rule, the absmax
reductions, the per-block commit -- runs as in the real step. If even the build without both
conversions is not below torch's time, no 8-bit format whose conversions cost anything meets the
line on that machine.

Each variant runs in its own process (one build per process), interleaved with torch's fused
AdamW on the same size; the rounds cycle through the variants so that load on a shared machine
hits all of them. Reported: median dist8 / torch fused ratio per variant, and the medians in ms.

``--avx2`` builds every variant for the AVX2 path (``-mno-avx512f``) and holds torch to AVX2
(``ATEN_CPU_CAPABILITY=avx2``): on an AVX-512 machine, a stand-in for CPUs without AVX-512 (it keeps
this machine's memory system and load ports).

Usage: python bench/step_phases.py [--size 16M] [--rounds 5] [--maps dynamic,fp8] [--avx2] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402
from step import parse_size  # noqa: E402

VARIANTS = {
    "full step": "",
    "no encode": "-DDIST8_ABLATE_ENCODE",
    "no decode": "-DDIST8_ABLATE_DECODE",
    "no encode, no decode": "-DDIST8_ABLATE_ENCODE -DDIST8_ABLATE_DECODE",
}


def child(size: int, quant_map: str, reps: int) -> dict:
    """One process: the build named by DIST8_CPU_FLAGS, interleaved with torch fused AdamW."""
    import dist8
    from dist8.kernels import native

    native.load_backend("cpu")
    features = torch.ops.dist8_cpu_info.features()
    flags = os.environ.get("DIST8_CPU_FLAGS", "")
    ablated = "DIST8_ABLATE" in flags
    assert ("ABLATED" in features) == ablated, f"build does not match DIST8_CPU_FLAGS={flags!r}: {features}"
    if "-mno-avx512f" in flags:
        assert features.startswith("avx2"), f"the AVX2 build was asked for: {features}"
    features += f"; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    gen = torch.Generator().manual_seed(0)
    p8 = torch.nn.Parameter(torch.randn(size, generator=gen))
    p32 = torch.nn.Parameter(p8.detach().clone())
    p8.grad = torch.randn(size, generator=gen) * 1e-3
    p32.grad = p8.grad.clone()
    ours = dist8.AdamW8bit([p8], lr=1e-3, quant_map=quant_map)
    theirs = torch.optim.AdamW([p32], lr=1e-3, fused=True)
    for _ in range(2):
        ours.step()
        theirs.step()
    times: dict[str, list[float]] = {"dist8": [], "torch": []}
    for r in range(reps):
        for name, opt in (("dist8", ours), ("torch", theirs)) if r % 2 else (("torch", theirs), ("dist8", ours)):
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    return {"features": features, "dist8": times["dist8"], "torch": times["torch"]}


def run_child(flags: str, size: int, quant_map: str, reps: int, avx2: bool = False) -> dict:
    env = dict(os.environ, DIST8_CPU_FLAGS=" ".join(f for f in (flags, "-mno-avx512f" if avx2 else "") if f))
    if avx2:
        env["ATEN_CPU_CAPABILITY"] = "avx2"
    cmd = [sys.executable, __file__, "--child", "--size", str(size), "--maps", quant_map, "--reps", str(reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"variant {flags or 'full step'!r} failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="16M")
    parser.add_argument("--maps", default="dynamic,fp8")
    parser.add_argument("--rounds", type=int, default=5, help="passes over all variants")
    parser.add_argument("--reps", type=int, default=6, help="interleaved steps per process and optimizer")
    parser.add_argument("--avx2", action="store_true", help="the AVX2 path (and torch held to AVX2)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.child:
        print(json.dumps(child(size, args.maps, args.reps)))
        return None
    load_before = os.getloadavg()[0]
    maps = [m.strip() for m in args.maps.split(",")]
    runs = {(m, v): [] for m in maps for v in VARIANTS}
    features = {}
    for key in runs:  # build every variant once before timing anything
        run_child(VARIANTS[key[1]], 1 << 16, key[0], 1, args.avx2)
    for r in range(args.rounds):
        keys = list(runs) if r % 2 == 0 else list(reversed(runs))
        for key in keys:
            res = run_child(VARIANTS[key[1]], size, key[0], args.reps, args.avx2)
            features[key[1]] = res["features"]
            runs[key].append(res)
    rows = []
    for (quant_map, variant), results in runs.items():
        ratios = [statistics.median(x["dist8"]) / statistics.median(x["torch"]) for x in results]
        rows.append({"map": quant_map, "build": variant,
                     "dist8 ms": 1e3 * statistics.median(t for x in results for t in x["dist8"]),
                     "torch fused ms": 1e3 * statistics.median(t for x in results for t in x["torch"]),
                     "dist8 / torch fused": statistics.median(ratios),
                     "range": f"{min(ratios):.2f}-{max(ratios):.2f}"})
    print_table(rows, ["map", "build", "dist8 ms", "torch fused ms", "dist8 / torch fused", "range"])
    meta = dict(machine(), load_average=f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    payload = {"benchmark": "step_phases", "machine": meta, "size": args.size, "avx2": args.avx2,
               "rounds": args.rounds,
               "reps": args.reps, "builds": {v: VARIANTS[v] for v in VARIANTS}, "dist8_cpu_path": features,
               "unit": "ms per step (median over rounds x reps), fp32, 2 threads; ratio: median over rounds of "
                       "each process's dist8 / torch fused medians",
               "rows": rows}
    print(f"wrote {write_json('ablation-avx2' if args.avx2 else 'ablation', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
