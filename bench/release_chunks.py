"""What ``weight_grad_chunk`` costs in time: one training iteration, chunked gradient release vs the rest.

Same model as bench/memory.py (LAYERS x [LayerNorm, Linear(WIDTH, WIDTH)], bf16 weights with
fp32 norms, ``master_weight_bits=24``, AdamW8bit), one iteration = forward, backward and the
optimizer's step (inside backward with gradient release). Systems, timed round-robin in one
process (each round runs every system once, in a rotating order), median over rounds:

  normal step                 ``loss.backward(); opt.step(); opt.zero_grad()``
  gradient release            ``dist8.gradient_release(model, opt)``
  release + chunks of N       ``dist8.gradient_release(model, opt, weight_grad_chunk=N)``

Usage: python bench/release_chunks.py [--width 1024] [--layers 8] [--tokens 256] [--rounds 15]
       [--chunks 65536 262144] [--device cpu|cuda] [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402
from memory import KW, build_model  # noqa: E402


def build(width: int, layers: int, release: bool, chunk: int | None, device: torch.device):
    import dist8

    model = build_model(width, layers, torch.bfloat16).to(device)
    opt = dist8.AdamW8bit(model.named_parameters(), **KW, master_weight_bits=24)
    if release:
        dist8.gradient_release(model, opt, weight_grad_chunk=chunk)
    return model, opt


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256, help="rows of the batch (tokens) per iteration")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--chunks", type=int, nargs="*", default=[65536, 262144])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    systems = {"normal step": (False, None), "gradient release": (True, None)}
    systems.update({f"release + weight_grad_chunk={c}": (True, c) for c in args.chunks})
    built = {name: build(args.width, args.layers, *spec, device) for name, spec in systems.items()}
    x = torch.randn(args.tokens, args.width, generator=torch.Generator().manual_seed(0)).to(device, torch.bfloat16)

    def iteration(model, opt):
        model(x).float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for model, opt in built.values():  # warm-up: state, kernels, allocator
        iteration(model, opt)
        iteration(model, opt)
    times: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            t0 = time.perf_counter()
            iteration(*built[name])
            sync()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["normal step"])
    rows = [{"system": name, "ms": 1e3 * statistics.median(t), "x normal step": statistics.median(t) / base,
             "min ms": 1e3 * min(t)} for name, t in times.items()]
    print_table(rows, ["system", "ms", "min ms", "x normal step"])
    payload = {"benchmark": "release_chunks", "machine": machine(), "device": str(device), "width": args.width,
               "layers": args.layers,
               "tokens": args.tokens, "rounds": args.rounds, "unit": "ms per iteration (median)", "rows": rows}
    print(f"wrote {write_json('release-chunks', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
