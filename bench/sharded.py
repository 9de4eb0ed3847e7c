"""Sharded benchmark: per-rank optimizer-state bytes, step time and bytes sent, on 1/2/4 gloo ranks (NCCL on GPUs).

Systems (each in the same spawned process group, interleaved per world size):
  ddp+adamw          DDP + torch.optim.AdamW (fp32 state, replicated)
  ddp+dist8          DDP + dist8.AdamW8bit (8-bit state, replicated)
  zero+adamw         torch ZeroRedundancyOptimizer(AdamW) (fp32 state, sharded)
  dist8-stage1       DDP + dist8.ShardedOptimizer(stage=1)
  dist8-stage2       dist8.ShardedOptimizer(stage=2), no DDP
  fsdp2+adamw        FSDP2 (fully_shard per layer) + torch AdamW
  fsdp2+torchao      FSDP2 + torchao AdamW8bit
  fsdp2+dist8        FSDP2 + dist8.AdamW8bit
  deepspeed-zero2+*  DeepSpeed ZeRO-2 with torch AdamW, bitsandbytes AdamW8bit, or the "dist8.AdamW8bit" config type
Goals (issue 4): state bytes/rank = (2 + 8/256)/N per parameter; dist8 step time <= DDP + unsharded 8-bit AdamW.

Usage: python bench/sharded.py [--quick|--full] [--world-sizes 1 2 4] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, machine, print_table, write_json  # noqa: E402

PRESETS = {"quick": dict(width=1024, layers=8, batch=8, steps=6), "full": dict(width=2048, layers=12, batch=8, steps=12)}
SYSTEMS = ["ddp+adamw", "ddp+dist8", "zero+adamw", "dist8-stage1", "dist8-stage2", "fsdp2+adamw", "fsdp2+torchao",
           "fsdp2+dist8", "deepspeed-zero2+adamw", "deepspeed-zero2+bnb", "deepspeed-zero2+dist8"]


def build_model(width: int, layers: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*mods).to(device)


def tensor_bytes(t) -> int:
    """Local bytes of a state tensor: DTensors count their local shard, tensor subclasses their parts."""
    if hasattr(t, "to_local"):
        t = t.to_local()
    parts = [getattr(t, name) for name in ("codes", "scale", "qmap") if torch.is_tensor(getattr(t, name, None))]
    if parts:  # torchao's quantized optimizer state subclass
        return sum(tensor_bytes(p) for p in parts)
    return t.numel() * t.element_size() if t.dim() > 0 else 0


def state_bytes(opt) -> int:
    if hasattr(opt, "state_nbytes"):
        return opt.state_nbytes()
    if hasattr(opt, "optim"):  # ZeroRedundancyOptimizer keeps the local optimizer in .optim
        opt = opt.optim
    return sum(tensor_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def make_system(name: str, model: torch.nn.Module):
    import dist8
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    kw = dict(lr=1e-4, weight_decay=0.01)
    if name == "ddp+adamw":
        return DDP(model), torch.optim.AdamW(model.parameters(), **kw)
    if name == "ddp+dist8":
        return DDP(model), dist8.AdamW8bit(model.parameters(), **kw)
    if name == "zero+adamw":
        return DDP(model), ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, **kw)
    if name == "dist8-stage1":
        return DDP(model), dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=1, **kw)
    if name == "dist8-stage2":
        return model, dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=2, **kw)
    if name.startswith("deepspeed"):
        return _deepspeed(name, model, kw)
    if name.startswith("fsdp2"):
        from dist8.integrations.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        if name == "fsdp2+adamw":
            return model, torch.optim.AdamW(model.parameters(), **kw)
        if name == "fsdp2+torchao":
            from torchao.optim import AdamW8bit

            return model, AdamW8bit(model.parameters(), **kw)
        return model, dist8.AdamW8bit(model.named_parameters(), **kw)
    raise ValueError(name)


class _DeepSpeedStep:
    """Adapts a DeepSpeed engine to the (module, optimizer) interface the timing loop uses."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.loss = None

    def __call__(self, x):
        return self.engine(x)

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def zero_grad(self) -> None:
        pass  # the engine zeroes after step

    def step(self) -> None:
        self.engine.step()

    def state_nbytes(self) -> int:
        basic = self.engine.basic_optimizer if hasattr(self.engine, "basic_optimizer") else self.engine.optimizer
        return basic.state_nbytes() if hasattr(basic, "state_nbytes") else state_bytes(basic)


def _deepspeed(name: str, model: torch.nn.Module, kw: dict):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    import dist8.integrations.deepspeed as d8ds

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True}
    if name.endswith("+dist8"):
        config["optimizer"] = {"type": "dist8.AdamW8bit", "params": dict(kw)}
        engine, *_ = d8ds.initialize(model=model, model_parameters=model.parameters(), config=config)
    else:
        if name.endswith("+bnb"):
            import bitsandbytes as bnb

            client = bnb.optim.AdamW8bit(model.parameters(), **kw)
        else:
            client = torch.optim.AdamW(model.parameters(), **kw)
        engine, *_ = deepspeed.initialize(model=model, optimizer=client, config=config)
    step = _DeepSpeedStep(engine)
    return step, step


def worker(rank: int, world_size: int, port: int, preset: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    device = torch.device("cuda", rank) if torch.cuda.is_available() else torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    results = []
    for name in SYSTEMS:
        model = build_model(preset["width"], preset["layers"], device)
        n_params = sum(p.numel() for p in model.parameters())
        try:
            wrapped, opt = make_system(name, model)
        except Exception as exc:  # noqa: BLE001 - an anchor that is not installed is recorded, not fatal
            results.append({"system": name, "world_size": world_size, "params": n_params, "error": repr(exc)[:200]})
            continue
        x = torch.randn(preset["batch"], preset["width"], device=device)
        times, opt_times = [], []
        for _step in range(preset["steps"] + 2):
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = wrapped(x).square().mean()
            opt.backward(loss) if isinstance(opt, _DeepSpeedStep) else loss.backward()
            t1 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            times.append(t2 - t0)
            opt_times.append(t2 - t1)
        sent = None
        if hasattr(opt, "stage2_grads"):
            reduced = opt.stage2_grads.buckets.bytes_sent if opt.stage2_grads else 0
            sent = (reduced + opt.bytes_gathered) / (preset["steps"] + 2)
        local = torch.tensor([state_bytes(opt)], dtype=torch.float64)
        gathered = [torch.zeros(1, dtype=torch.float64) for _ in range(world_size)]
        dist.all_gather(gathered, local)
        per_rank = [int(g.item()) for g in gathered]
        results.append({"system": name, "world_size": world_size, "params": n_params,
                        "state_bytes_max_rank": max(per_rank), "state_bytes_per_param_per_rank": max(per_rank) / n_params,
                        "iter_s": statistics.median(times[2:]), "opt_step_s": statistics.median(opt_times[2:]),
                        "bytes_sent_per_step_rank": sent})
        del wrapped, opt, model
        dist.barrier()
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    preset = PRESETS["full" if args.full else "quick"]
    rows = []
    for n in args.world_sizes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.pt")
            port = free_port()
            mp.spawn(worker, args=(n, port, preset, out), nprocs=n, join=True)
            rows += torch.load(out)
    base = {r["world_size"]: r["iter_s"] for r in rows if r["system"] == "ddp+dist8"}
    for r in rows:
        r["iter_vs_ddp_dist8"] = r["iter_s"] / base[r["world_size"]] if "iter_s" in r and r["world_size"] in base else None
    print_table(rows, ["system", "world_size", "params", "state_bytes_per_param_per_rank", "iter_s", "opt_step_s",
                       "iter_vs_ddp_dist8", "bytes_sent_per_step_rank"])
    goals = []
    for r in rows:
        if r["system"].startswith("dist8-stage") and "error" not in r:
            target = (2 + 8 / 256) / r["world_size"]
            goals.append({"system": r["system"], "world_size": r["world_size"], "bytes_goal": target,
                          "bytes": r["state_bytes_per_param_per_rank"],
                          "bytes_met": r["state_bytes_per_param_per_rank"] <= target * 1.01,
                          "time_met": r["iter_vs_ddp_dist8"] is not None and r["iter_vs_ddp_dist8"] <= 1.0})
    payload = {"benchmark": "sharded", "machine": machine(), "preset": preset, "rows": rows, "goals": goals}
    print(f"wrote {write_json('sharded-full' if args.full else 'sharded', payload, args.out)}")
    return payload


if __name__ == "__main__":
    main()
