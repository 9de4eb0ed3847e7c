"""The CPU kernels' two table-lookup modes, A/B on the same optimizer state (DIST8_CPU_GATHER).

The AVX2 and AVX-512 paths load code-table entries either with hardware gathers (``hw``) or with
scalar loads (``scalar``); the results are bit-identical, the default depends on the CPU vendor
(docs/design.md, Kernels). bench/step.py compares them as separate optimizer instances, whose
memory placement alone moves a row by several percent on a shared VM; here one AdamW8bit instance
steps alternately in each mode (the variable is read at each op call), so only the mode differs.
Median ms per step and the ratio scalar / hw, per size.

Usage: python bench/lookup_modes.py [--sizes 16M,64M,gpt2] [--rounds 20] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402
from step import MODELS, parse_size  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import dist8
    from dist8.kernels import native

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="16M,64M,gpt2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    native.load_backend("cpu")
    features = torch.ops.dist8_cpu_info.features()
    rows = []
    for label in args.sizes.split(","):
        shapes = MODELS.get(label.strip().upper(), [(parse_size(label),)])
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = dist8.AdamW8bit(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt.step()
        times: dict[str, list[float]] = {"hw": [], "scalar": []}
        previous = os.environ.get("DIST8_CPU_GATHER")
        try:
            for r in range(args.rounds):
                for mode in (("hw", "scalar") if r % 2 else ("scalar", "hw")):
                    os.environ["DIST8_CPU_GATHER"] = mode
                    t0 = time.perf_counter()
                    opt.step()
                    times[mode].append(time.perf_counter() - t0)
        finally:
            os.environ.pop("DIST8_CPU_GATHER", None)
            if previous is not None:
                os.environ["DIST8_CPU_GATHER"] = previous
        hw, scalar = statistics.median(times["hw"]), statistics.median(times["scalar"])
        rows.append({"size": label, "hw ms": 1e3 * hw, "scalar ms": 1e3 * scalar, "scalar / hw": scalar / hw})
        del opt, params
    print(features)
    print_table(rows, ["size", "hw ms", "scalar ms", "scalar / hw"])
    payload = {"benchmark": "lookup_modes", "machine": machine(), "dist8_cpu_path": features, "rounds": args.rounds,
               "unit": "ms per AdamW8bit step (median), fp32, one instance stepping in both modes", "rows": rows}
    print(f"wrote {write_json('lookup-modes', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
