"""A driver for Nsight Compute: dist8's fused AdamW8bit update on one tensor, block then warp kernel.

    ncu --clock-control none -k regex:fused_update --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats python3 bench/gpu_profile.py

Two warm-up steps with the default kernel, then one step with each variant (launches 3 and 4).
"""
from __future__ import annotations

import os
import sys

import torch

import dist8


def main(n: int = 1 << 24) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{__file__}: needs a CUDA device (torch.cuda.is_available() is False); on a CPU "
                         "machine use bench/memory.py / bench/step.py --device cpu")
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, device="cuda") * 0.02)
    p.grad = torch.randn(n, device="cuda") * 1e-3
    opt = dist8.AdamW8bit([p], lr=1e-3, weight_decay=1e-2)
    for variant in ("block", "block", "block", "warp"):
        os.environ["DIST8_CUDA_KERNEL"] = variant
        opt.step()
    torch.cuda.synchronize()
    print("stepped", n, "values", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", nargs="?", type=int, default=1 << 24, help="values in the tensor (default 16M)")
    main(ap.parse_args().n)
