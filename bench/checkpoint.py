"""Checkpoint benchmark: optimizer-state bytes on disk and save/load time, dist8 vs torch.save and DCP of fp32 AdamW.

Usage: python bench/checkpoint.py [--quick|--full] [--world-sizes 1 4] [--out FILE]
Goal (issue 5): dist8 optimizer-state bytes on disk <= 0.26 of fp32 AdamW's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, print_table, write_json  # noqa: E402

PRESETS = {"quick": dict(width=1024, layers=12), "full": dict(width=2048, layers=12)}


def dir_bytes(path: str, prefix: str = "") -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.startswith(prefix))


def build(width: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def one_step(model, opt) -> None:
    opt.zero_grad()
    model(torch.randn(2, model[0].in_features)).square().mean().backward()
    opt.step()


def worker(rank: int, world_size: int, port: int, preset: dict, root: str, out: str) -> None:
    import dist8
    import dist8.checkpoint as ck
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    rows = []
    model = build(**preset)
    n = sum(p.numel() for p in model.parameters())
    opt = dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-4)
    one_step(model, opt)
    path = os.path.join(root, f"dist8-{world_size}")
    dist.barrier()
    t0 = time.perf_counter()
    ck.save(path, None, opt, step=1)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck.load(path, None, opt)
    dist.barrier()
    t_load = time.perf_counter() - t0
    if rank == 0:
        rows.append({"system": "dist8 AdamW8bit (ShardedOptimizer)", "world_size": world_size, "params": n,
                     "optim_bytes_on_disk": dir_bytes(path, "optim-"), "save_s": t_save, "load_s": t_load})
    # fp32 AdamW (replicated under DDP) through DCP
    ref = build(**preset)
    adamw = torch.optim.AdamW(ref.parameters(), lr=1e-4)
    one_step(ref, adamw)
    dpath = os.path.join(root, f"dcp-{world_size}")
    dist.barrier()
    t0 = time.perf_counter()
    dcp.save({"optim": get_optimizer_state_dict(ref, adamw)}, checkpoint_id=dpath)
    t_save = time.perf_counter() - t0
    t0 = time.perf_counter()
    sd = {"optim": get_optimizer_state_dict(ref, adamw)}
    dcp.load(sd, checkpoint_id=dpath)
    t_load = time.perf_counter() - t0
    if rank == 0:
        rows.append({"system": "fp32 AdamW via DCP", "world_size": world_size, "params": n,
                     "optim_bytes_on_disk": dir_bytes(dpath), "save_s": t_save, "load_s": t_load})
        tpath = os.path.join(root, f"torch-{world_size}.pt")
        t0 = time.perf_counter()
        torch.save(adamw.state_dict(), tpath)
        t_save = time.perf_counter() - t0
        t0 = time.perf_counter()
        adamw.load_state_dict(torch.load(tpath, weights_only=True))
        rows.append({"system": "fp32 AdamW via torch.save", "world_size": world_size, "params": n,
                     "optim_bytes_on_disk": os.path.getsize(tpath), "save_s": t_save,
                     "load_s": time.perf_counter() - t0})
        torch.save(rows, out)
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    rows = []
    root = tempfile.mkdtemp(prefix="dist8-ckpt-bench-")
    try:
        for n in args.world_sizes:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            out = os.path.join(root, f"rows-{n}.pt")
            mp.spawn(worker, args=(n, port, preset, root, out), nprocs=n, join=True)
            rows += torch.load(out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    fp32 = {r["world_size"]: r["optim_bytes_on_disk"] for r in rows if r["system"] == "fp32 AdamW via torch.save"}
    for r in rows:
        r["bytes_vs_fp32"] = r["optim_bytes_on_disk"] / fp32[r["world_size"]]
    print_table(rows, ["system", "world_size", "params", "optim_bytes_on_disk", "bytes_vs_fp32", "save_s", "load_s"])
    ratios = [r["bytes_vs_fp32"] for r in rows if r["system"].startswith("dist8")]
    goal = {"goal": "dist8 optimizer-state bytes on disk <= 0.26 of fp32", "worst_ratio": max(ratios),
            "met": max(ratios) <= 0.26}
    print(f"goal: {goal['goal']}: worst {goal['worst_ratio']:.4f}: {'met' if goal['met'] else 'NOT met'}")
    payload = {"benchmark": "checkpoint", "machine": machine(), "preset": preset, "rows": rows, "goal": goal}
    print(f"wrote {write_json('checkpoint-full' if args.full else 'checkpoint', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
