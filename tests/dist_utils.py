"""Spawn gloo process groups on this machine for multi-rank tests."""
import os
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # All work is done and saved. Leave without process-group/interpreter teardown: gloo's
    # shutdown occasionally aborts ("terminate called without an active exception") after
    # every collective has completed, which would fail a test that already passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size, *args, tmp_path):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the per-rank results."""
    out_dir = str(tmp_path / f"ranks-{fn.__name__}-{world_size}-{free_port()}")
    os.makedirs(out_dir)
    try:
        mp.spawn(_worker, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=True)
    except Exception as exc:
        errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
        raise AssertionError("rank failed:\n" + "\n".join(errors)) from exc
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
