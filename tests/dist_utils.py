"""Spawn gloo process groups on this machine for multi-rank tests.

Ranks are forked from a forkserver that imported torch and dist8 once (``_PRELOAD``), instead of
each rank starting a fresh interpreter that imports them again (about 5 s of CPU per rank here,
a minute of wall time per rank on a busy 2-core machine; the 4 -> 1,2,3,4 checkpoint test starts
24 ranks). Each rank takes the test's current environment and working directory, as a spawned
rank would.
"""
import multiprocessing
import os
import random
import socket
import sys
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (inclusive)."""
    try:
        low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port that nothing listens on now, chosen outside the kernel's ephemeral range.

    ``bind(0)`` would hand out an ephemeral port, which any outgoing connection (gloo opens many
    between ranks of the tests running beside this one) may take before the rendezvous store
    binds it; one CI run lost a test to exactly that. Below the range only listeners compete,
    and the bind check rules out those already there."""
    low, high = ephemeral_port_range()
    lo, hi = (20000, low - 1) if low > 21000 else (high + 1, 65535)
    rng = random.Random()  # unseeded: tests that seed the global RNG must not draw the same port
    for _ in range(200):
        port = rng.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free TCP port in {lo}-{hi}")


_PRELOAD = ["torch", "torch.distributed", "torch.distributed.fsdp", "torch.distributed.checkpoint", "dist8.optim",
            "dist8.shard", "dist8.checkpoint", "dist_utils"]


def _worker(rank, world_size, port, fn, args, out_dir, environ, cwd):
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
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


def _port_taken(exc: BaseException) -> bool:
    """The rendezvous store could not listen on its port: another listener took it between
    :func:`free_port`'s check and the bind (one CI run lost a test to it). Raised by
    ``init_process_group``, before ``fn`` ran, so the ranks can start again on another port."""
    return "EADDRINUSE" in str(exc)


def run_ranks(fn, world_size, *args, tmp_path):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the per-rank results."""
    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)  # used when the server first starts
    for attempt in range(3):
        out_dir = str(tmp_path / f"ranks-{fn.__name__}-{world_size}-{free_port()}")
        os.makedirs(out_dir)
        try:
            mp.start_processes(_worker, args=(world_size, free_port(), fn, args, out_dir, dict(os.environ),
                                              os.getcwd()), nprocs=world_size, join=True, start_method="forkserver")
        except Exception as exc:
            if _port_taken(exc) and attempt < 2:
                continue
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir)) if f.endswith(".err")]
            raise AssertionError("rank failed:\n" + "\n".join(errors)) from exc
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
