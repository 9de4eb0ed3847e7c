"""Two settings of a CPU-kernel switch, A/B on the same optimizer state.

The switches (docs/design.md, Kernels; results bit-identical either way): ``DIST8_CPU_GATHER=hw|scalar``,
how the AVX2 and AVX-512 paths load code-table entries (hardware gathers or scalar loads; the default
depends on the CPU vendor), and ``DIST8_CPU_CODES=table|runs``, whether the AVX-512 path looks the
codes of every map up in its key table or computes those of a map made of linear runs (the dynamic
map; the default on AMD Zen 5).
bench/step.py compares settings as separate optimizer instances, whose memory placement alone moves a
row by several percent on a shared VM; here one AdamW8bit instance steps alternately in each setting
(the variables are read at each op call), so only the setting differs. Median ms per step and the
ratio of the second setting to the first, per size.

Usage: python bench/lookup_modes.py [--switch DIST8_CPU_GATHER=hw,scalar | DIST8_CPU_CODES=table,runs]
                                    [--sizes 16M,64M,gpt2] [--rounds 20] [--out FILE]
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
    parser.add_argument("--switch", default="DIST8_CPU_GATHER=hw,scalar", help="VARIABLE=A,B")
    parser.add_argument("--sizes", default="16M,64M,gpt2")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    variable, _, settings = args.switch.partition("=")
    first, second = settings.split(",")
    native.load_backend("cpu")
    features = torch.ops.dist8_cpu_info.features()
    load_before = os.getloadavg()[0]
    rows = []
    for label in args.sizes.split(","):
        shapes = MODELS.get(label.strip().upper(), [(parse_size(label),)])
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        opt = dist8.AdamW8bit(params, lr=1e-3)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt.step()
        times: dict[str, list[float]] = {first: [], second: []}
        previous = os.environ.get(variable)
        try:
            for r in range(args.rounds):
                for value in ((first, second) if r % 2 else (second, first)):
                    os.environ[variable] = value
                    t0 = time.perf_counter()
                    opt.step()
                    times[value].append(time.perf_counter() - t0)
        finally:
            os.environ.pop(variable, None)
            if previous is not None:
                os.environ[variable] = previous
        a, b = statistics.median(times[first]), statistics.median(times[second])
        rows.append({"size": label, f"{first} ms": 1e3 * a, f"{second} ms": 1e3 * b, f"{second} / {first}": b / a})
        del opt, params
    print(features)
    print_table(rows, ["size", f"{first} ms", f"{second} ms", f"{second} / {first}"])
    meta = dict(machine(), load_average=f"{load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    payload = {"benchmark": "lookup_modes", "machine": meta, "dist8_cpu_path": features, "rounds": args.rounds,
               "switch": variable, "settings": [first, second],
               "unit": "ms per AdamW8bit step (median), fp32, one instance stepping in both modes", "rows": rows}
    name = "lookup-modes" if variable == "DIST8_CPU_GATHER" else "run-codes"
    print(f"wrote {write_json(name, payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
