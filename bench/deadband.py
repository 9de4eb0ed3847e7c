"""The deadband of 8-bit round-to-nearest state: slow EMAs that cannot follow their input (data for a decision).

A state value that is not its block's largest changes only when one step's increment ``(1 - beta) * (g - m)``
exceeds half the gap to the next code of the map (times the block's absmax). With beta close to 1 -- Lion's
momentum (0.99), AdEMAMix's slow EMA (0.999-0.9999), Adam's second moment (0.999) -- it seldom does, and the
state keeps a stale code. Two measurements, CPU, in one process:

* ``optimizers``: a gradient stream where element 0 of every 256-value block has a steady gradient of 1 (an
  outlier feature) and the other elements a gradient of +s that flips to -s at step ``flip``; the table gives
  the mean step of the other elements over the last 100 steps in units of lr, positive = downhill after the
  flip, for the 32-bit optimizer, dist8's 8-bit one and bitsandbytes' 8-bit one (same hyperparameters).
* ``ema``: the EMA alone on 8-bit block-wise state (the dynamic signed map, absmax per 256), encoded by
  round-to-nearest (what dist8 and bitsandbytes do) or by unbiased stochastic rounding (a simulation in
  float64: the upper neighbour code with probability (x - lo) / (hi - lo)), against float64; the mean
  state of the other elements at several steps (its sign should follow the flip).

Usage: python bench/deadband.py [--steps 3000] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

import dist8  # noqa: E402
from dist8.quant import dynamic_map  # noqa: E402

BLOCKS = 16
N = 256 * BLOCKS


def flip_stream(s: float, flip: int, sigma: float, seed: int = 0):
    """Step -> gradient: element 0 of each block 1 (+ noise), the others +s (+ noise), -s from ``flip`` on."""
    gen = torch.Generator().manual_seed(seed)

    def grad(t: int) -> torch.Tensor:
        g = torch.full((N,), s * (-1.0 if t >= flip else 1.0)) + sigma * torch.randn(N, generator=gen)
        g.view(BLOCKS, 256)[:, 0] = 1.0 + sigma * torch.randn(BLOCKS, generator=gen)
        return g

    return grad


def mean_step_of_the_others(make, grad, steps: int, lr: float) -> float:
    """Mean parameter change per step of the non-outlier elements over the last 100 steps, in units of lr,
    sign flipped so that positive is downhill for the gradient after the flip (-s)."""
    p = torch.nn.Parameter(torch.zeros(N))
    opt = make([p])
    before = None
    for t in range(steps):
        if t == steps - 100:
            before = p.detach().clone()
        p.grad = grad(t)
        opt.step()
    others = (p.detach() - before).view(BLOCKS, 256)[:, 1:]
    return float(others.mean()) / lr / 100


def optimizer_rows(steps: int) -> list[dict]:
    import bitsandbytes as bnb

    lr = 1e-3
    cases = [
        ("Lion, betas (0.9, 0.99)", dict(betas=(0.9, 0.99), weight_decay=0.0),
         (dist8.Lion32bit, dist8.Lion8bit, bnb.optim.Lion8bit), 0.3, 0.0),
        ("Lion, betas (0.9, 0.99), noise", dict(betas=(0.9, 0.99), weight_decay=0.0),
         (dist8.Lion32bit, dist8.Lion8bit, bnb.optim.Lion8bit), 0.3, 0.3),
        ("AdEMAMix, beta3 0.999", dict(betas=(0.9, 0.999, 0.999), weight_decay=0.0),
         (dist8.AdEMAMix32bit, dist8.AdEMAMix8bit, bnb.optim.AdEMAMix8bit), 0.3, 0.0),
        ("AdEMAMix, beta3 0.999, noise", dict(betas=(0.9, 0.999, 0.999), weight_decay=0.0),
         (dist8.AdEMAMix32bit, dist8.AdEMAMix8bit, bnb.optim.AdEMAMix8bit), 0.1, 0.3),
        ("AdamW, betas (0.9, 0.999)", dict(betas=(0.9, 0.999), weight_decay=0.0),
         (dist8.AdamW32bit, dist8.AdamW8bit, bnb.optim.AdamW8bit), 0.3, 0.0),
    ]
    rows = []
    for name, kw, (ours32, ours8, theirs8), s, sigma in cases:
        flip = steps // 6
        row = {"case": name, "s": s, "noise": sigma, "flip_at": flip}
        for label, cls in (("32-bit", ours32), ("dist8 8-bit", ours8), ("bitsandbytes 8-bit", theirs8)):
            row[label] = mean_step_of_the_others(lambda ps, cls=cls: cls(ps, lr=lr, **kw),
                                                 flip_stream(s, flip, sigma), steps, lr)
        rows.append(row)
    return rows


def _encode(x: torch.Tensor, sorted_codes: torch.Tensor, stochastic: bool, gen: torch.Generator) -> torch.Tensor:
    """8-bit block-wise quantize-dequantize of ``x`` (float64) to the nearest or a stochastically chosen code."""
    blocks = x.view(-1, 256)
    absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-30)
    y = (blocks / absmax).reshape(-1)
    hi_i = torch.searchsorted(sorted_codes, y).clamp(max=sorted_codes.numel() - 1)
    lo, hi = sorted_codes[(hi_i - 1).clamp(min=0)], sorted_codes[hi_i]
    if stochastic:
        up = torch.rand(y.shape, generator=gen, dtype=torch.float64) < ((y - lo) / (hi - lo).clamp_min(1e-300))
    else:
        up = (hi - y) < (y - lo)
    return (torch.where((hi == y) | up, hi, lo).view(-1, 256) * absmax).reshape(-1)


def ema_rows(steps: int) -> list[dict]:
    codes, _ = torch.sort(dynamic_map(signed=True).double())
    at = [steps // 10 - 1, steps // 5, steps // 3, 2 * steps // 3, steps - 1]
    rows = []
    for beta, s, sigma in [(0.99, 0.3, 0.0), (0.99, 0.03, 0.0), (0.999, 0.3, 0.0), (0.9999, 0.1, 0.1)]:
        grad = flip_stream(s, steps // 10, sigma, seed=1)
        for mode in ("float64", "round-to-nearest", "stochastic"):
            gen = torch.Generator().manual_seed(2)
            m = torch.zeros(N, dtype=torch.float64)
            seen = {}
            for t in range(steps):
                m = beta * m + (1 - beta) * grad(t).double()
                if mode != "float64":
                    m = _encode(m, codes, mode == "stochastic", gen)
                if t in at:
                    seen[t] = float(m.view(BLOCKS, 256)[:, 1:].mean())
            rows.append({"beta": beta, "s": s, "noise": sigma, "rounding": mode,
                         **{f"m at {t}": seen[t] for t in at}})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    optimizers = optimizer_rows(args.steps)
    print_table(optimizers, ["case", "s", "noise", "flip_at", "32-bit", "dist8 8-bit", "bitsandbytes 8-bit"])
    ema = ema_rows(args.steps)
    print_table(ema, list(ema[0]))
    payload = {"benchmark": "deadband", "machine": machine(), "steps": args.steps, "optimizers": optimizers,
               "ema": ema}
    print(f"wrote {write_json('deadband', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
