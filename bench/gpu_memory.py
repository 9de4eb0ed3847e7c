"""Bytes per parameter on one GPU during a real training step: dist8 vs torch, bitsandbytes and FlashOptim.

The GPU twin of bench/memory.py (which reads the CPU allocator): here the CUDA caching
allocator's own counters. For each system, in one process, one after the other: build the
model on the GPU, one warm-up step (creates the optimizer state), then one measured step
(forward, backward, ``step``, ``zero_grad``) between ``reset_peak_memory_stats`` and
``max_memory_allocated``. Reported per parameter, after subtracting what was allocated
before the model existed (cuBLAS workspace, the input batch):

  peak     the most bytes alive during the measured step
  steady   bytes alive before it (parameters + state + what stays between steps)

FlashOptim (Triton, GPU only) is measured directly here, not quoted. Two models of the same
size: few wide layers (the largest gradient is 1/8 of the model: what gradient release
cannot free before the step) and many narrow ones.

    python bench/gpu_memory.py --out bench/results/gpu-memory-h200.json
"""
from __future__ import annotations

import argparse
import gc
import json
import platform

import torch


def make_model(layers: int, width: int, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width, bias=False), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods).to(device="cuda", dtype=dtype)


def systems():
    """name -> (param dtype, build(model) -> (step(), zero_grad()))"""
    import dist8

    def torch_adamw(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        return opt.step, lambda: opt.zero_grad(set_to_none=True)

    def dist8_adamw(master=None, release=False, chunk=None):
        def build(model):
            opt = dist8.AdamW8bit(model.parameters(), lr=1e-4, master_weight_bits=master)
            if release:  # steps inside backward; step/zero_grad become no-ops
                dist8.gradient_release(model, opt, weight_grad_chunk=chunk)
            return opt.step, lambda: opt.zero_grad(set_to_none=True)
        return build

    def bnb_adamw(model):
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-4)
        return opt.step, lambda: opt.zero_grad(set_to_none=True)

    def flash_adamw(master=24, release=False):
        def build(model):
            import warnings

            from flashoptim import FlashAdamW, enable_gradient_release

            opt = FlashAdamW(model.parameters(), lr=1e-4, master_weight_bits=master)
            if release:
                enable_gradient_release(model, opt)
                warnings.filterwarnings("ignore", message=".*gradient release.*")
            return opt.step, lambda: opt.zero_grad(set_to_none=True)
        return build

    return {
        "torch AdamW fused (fp32 params)": (torch.float32, torch_adamw),
        "bitsandbytes AdamW8bit (fp32 params)": (torch.float32, bnb_adamw),
        "dist8 AdamW8bit (fp32 params)": (torch.float32, dist8_adamw()),
        "FlashOptim FlashAdamW (fp32 params)": (torch.float32, flash_adamw(master=None)),
        "dist8 AdamW8bit bf16 + 24-bit master": (torch.bfloat16, dist8_adamw(24)),
        "FlashOptim FlashAdamW bf16 + 24-bit master": (torch.bfloat16, flash_adamw(24)),
        "dist8 AdamW8bit bf16 + 24-bit master + gradient release": (torch.bfloat16, dist8_adamw(24, True)),
        "dist8 AdamW8bit bf16 + 24-bit master + gradient release (weight_grad_chunk=1048576)":
            (torch.bfloat16, dist8_adamw(24, True, chunk=1 << 20)),
        "FlashOptim FlashAdamW bf16 + 24-bit master + gradient release": (torch.bfloat16, flash_adamw(24, True)),
    }


def measure(name, dtype, build, layers, width, batch=8) -> dict:
    gc.collect()
    torch.cuda.empty_cache()
    x = torch.randn(batch, width, device="cuda", dtype=dtype)
    torch.randn(8, 8, device="cuda", dtype=dtype) @ torch.randn(8, 8, device="cuda", dtype=dtype)  # cuBLAS handle
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    model = make_model(layers, width, dtype)
    n = sum(p.numel() for p in model.parameters())
    step, zero_grad = build(model)

    def train_step():
        model(x).float().square().mean().backward()
        step()
        zero_grad()

    train_step()  # warm-up: the optimizer state exists from here on
    torch.cuda.synchronize()
    steady = torch.cuda.memory_allocated() - base
    torch.cuda.reset_peak_memory_stats()
    train_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del model, step, zero_grad
    return dict(system=name, layers=layers, width=width, params=n, peak_bytes=peak, steady_bytes=steady,
                peak_per_param=peak / n, steady_per_param=steady / n)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="8x4096,32x2048", help="comma list of LAYERSxWIDTH")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(f"{__file__}: needs a CUDA device (torch.cuda.is_available() is False); on a CPU "
                         "machine use bench/memory.py / bench/step.py --device cpu")
    rows = []
    for spec in args.models.split(","):
        layers, width = (int(v) for v in spec.lower().split("x"))
        for name, (dtype, build) in systems().items():
            try:
                row = measure(name, dtype, build, layers, width)
            except Exception as exc:  # noqa: BLE001 - record and go on (e.g. a wheel not carried)
                row = dict(system=name, layers=layers, width=width, error=f"{type(exc).__name__}: {exc}"[:200])
            rows.append(row)
            if "error" in row:
                print(f"{spec:>8}  {name:<62} error: {row['error']}", flush=True)
            else:
                print(f"{spec:>8}  {name:<62} peak {row['peak_per_param']:6.2f}  steady {row['steady_per_param']:6.2f}"
                      " bytes/param", flush=True)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, host=platform.node())
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        print("wrote", args.out)


if __name__ == "__main__":
    main()
