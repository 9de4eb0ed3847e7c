"""Collectives that move quantized optimizer state as it is: uint8 codes and fp32 absmax.

Nothing here dequantizes. Pieces travel point to point from the rank that owns
them straight into their place in the destination tensor, so no rank stages more
than the piece in flight, and no rank ever holds an fp32 copy of 8-bit state.
Every function returns the bytes it put on the wire so callers can report them.
"""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from dist8.optim.state_schema import GNORM, PERCENTILE_HISTORY, flat_length, is_absmax_key, n_states
from dist8.quant import num_blocks

__all__ = ["gather_state", "scatter_state", "all_gather_state", "state_key_sizes", "piece_range", "fp32_state_bytes",
           "wait_for_every_rank", "collective_device", "WAIT_WARN_SECONDS"]

#: Seconds a rank waits in :func:`wait_for_every_rank` before it warns that the others have not come.
WAIT_WARN_SECONDS = 60.0


def state_key_sizes(key: str, numel: int, block_size: int) -> int:
    """Length of a flattened state tensor of a parameter with ``numel`` elements (the schema's answer)."""
    return flat_length(key, numel, block_size)


def piece_range(key: str, start: int, stop: int, block_size: int) -> tuple[int, int]:
    """``[a, b)`` of the flattened state tensor ``key`` that the piece ``[start, stop)`` of a parameter holds
    (whole blocks: absmax entries of its blocks; the percentile history whole)."""
    if key == GNORM:  # the same history on every piece of a parameter
        return 0, PERCENTILE_HISTORY
    if is_absmax_key(key):
        return start // block_size, num_blocks(stop, block_size)
    return start, stop


def _owners(optimizer) -> list[list[tuple[int, int, int]]]:
    """For each parameter: its pieces as (owner rank, start, stop)."""
    owners: list[list[tuple[int, int, int]]] = [[] for _ in optimizer.layout.params]
    for r in range(optimizer.world_size):
        for piece in optimizer.layout.pieces(r, optimizer.world_size):
            owners[piece.param].append((r, piece.start, piece.stop))
    return owners


def _key_specs(optimizer) -> list[dict[str, tuple[torch.dtype, int]]]:
    """Per parameter: state key -> (dtype, full length), the same on every rank.

    Owners know their piece's keys; one small all-gather of descriptions makes them global.
    """
    local = {}
    for i, st in optimizer.shard_state().items():
        local[i] = {k: str(v.dtype) for k, v in st.items() if torch.is_tensor(v)}
        local[i]["__step__"] = int(st.get("step", 0))
    gathered: list = [None] * optimizer.world_size
    if optimizer.world_size > 1:
        dist.all_gather_object(gathered, local, group=optimizer.group)
    else:
        gathered = [local]
    specs: list[dict] = [{} for _ in optimizer.layout.params]
    for per_rank in gathered:
        for i, keys in per_rank.items():
            specs[i].update(keys)
    out = []
    for slot, spec in zip(optimizer.layout.params, specs):
        entry = {}
        for key, dtype in spec.items():
            if key == "__step__":
                entry[key] = dtype
                continue
            entry[key] = (getattr(torch, dtype.split(".")[-1]), state_key_sizes(key, slot.numel, optimizer.layout.block_size))
        out.append(entry)
    return out


def _global(optimizer, r: int) -> int:
    return r if optimizer.group is None else dist.get_global_rank(optimizer.group, r)


def _empty_full(spec: dict, device: torch.device) -> dict[str, Any]:
    full: dict[str, Any] = {k: torch.empty(v[1], dtype=v[0], device=device) for k, v in spec.items() if k != "__step__"}
    full["step"] = spec["__step__"]
    return full


def _transfers(spec: dict, pieces: list[tuple[int, int, int]], block_size: int):
    """``(owner, key, a, b)`` for every range of one parameter's state tensors held by one rank."""
    for owner, start, stop in pieces:
        for key in spec:
            if key == "__step__" or (key == GNORM and start != 0):  # gnorm_vec: same on every piece
                continue
            a, b = piece_range(key, start, stop, block_size)
            yield owner, key, a, b


def gather_state(optimizer, dst: int = 0) -> tuple[dict[int, dict[str, Any]] | None, int]:
    """Full per-parameter state of a :class:`ShardedOptimizer` on rank ``dst`` (``None`` elsewhere).

    Returns ``(state, bytes_sent)``: ``state`` maps the parameter's layout index to
    a dict of flattened tensors (codes uint8, absmax fp32, ...) and ``step``.
    """
    specs = _key_specs(optimizer)
    mine = optimizer.shard_state()
    full: dict[int, dict[str, Any]] | None = {} if optimizer.rank == dst else None
    sent = 0
    for i, pieces in enumerate(_owners(optimizer)):
        if not specs[i]:
            continue  # no rank has state for this parameter yet
        if full is not None:
            full[i] = _empty_full(specs[i], optimizer.device)
        for owner, key, a, b in _transfers(specs[i], pieces, optimizer.layout.block_size):
            if owner == optimizer.rank == dst:
                full[i][key][a:b] = mine[i][key].reshape(-1)
            elif optimizer.rank == owner:
                tensor = mine[i][key].reshape(-1).contiguous()
                dist.send(tensor, dst=_global(optimizer, dst), group=optimizer.group)
                sent += tensor.numel() * tensor.element_size()
            elif optimizer.rank == dst:
                dist.recv(full[i][key][a:b], src=_global(optimizer, owner), group=optimizer.group)
    return full, sent


def scatter_state(optimizer, full_state: dict[int, dict[str, Any]] | None, src: int = 0) -> int:
    """Inverse of :func:`gather_state`: rank ``src`` holds ``full_state``; every rank receives its pieces.

    Returns the bytes sent (non-zero on ``src`` only).
    """
    if optimizer.world_size > 1:
        meta = [None]
        if optimizer.rank == src:
            meta = [{i: {k: (str(v.dtype), v.numel()) if torch.is_tensor(v) else v for k, v in st.items()}
                     for i, st in full_state.items()}]
        dist.broadcast_object_list(meta, src=_global(optimizer, src), group=optimizer.group)
        meta = meta[0]
    else:
        meta = {i: {k: (str(v.dtype), v.numel()) if torch.is_tensor(v) else v for k, v in st.items()}
                for i, st in full_state.items()}
    B = optimizer.layout.block_size
    received: dict[int, dict[str, Any]] = {}
    sent = 0
    for i, pieces in enumerate(_owners(optimizer)):
        if i not in meta:
            continue
        for owner, start, stop in pieces:
            for key, desc in meta[i].items():
                if not isinstance(desc, tuple):
                    if owner == optimizer.rank:
                        received.setdefault(i, {})[key] = desc
                    continue
                dtype = getattr(torch, desc[0].split(".")[-1])
                a, b = piece_range(key, start, stop, B)
                if owner == optimizer.rank == src:
                    received.setdefault(i, {})[key] = full_state[i][key].reshape(-1)[a:b].clone().to(optimizer.device)
                elif optimizer.rank == src:
                    tensor = full_state[i][key].reshape(-1)[a:b].contiguous().to(optimizer.device)
                    dist.send(tensor, dst=_global(optimizer, owner), group=optimizer.group)
                    sent += tensor.numel() * tensor.element_size()
                elif optimizer.rank == owner:
                    buf = torch.empty(b - a, dtype=dtype, device=optimizer.device)
                    dist.recv(buf, src=_global(optimizer, src), group=optimizer.group)
                    received.setdefault(i, {})[key] = buf
    optimizer.load_shard_state(received, copy=False)  # received tensors are this rank's alone
    return sent


def all_gather_state(optimizer) -> tuple[dict[int, dict[str, Any]], int]:
    """Full per-parameter state on every rank (each piece broadcast by its owner)."""
    specs = _key_specs(optimizer)
    mine = optimizer.shard_state()
    full: dict[int, dict[str, Any]] = {}
    sent = 0
    for i, pieces in enumerate(_owners(optimizer)):
        if not specs[i]:
            continue
        full[i] = _empty_full(specs[i], optimizer.device)
        for owner, key, a, b in _transfers(specs[i], pieces, optimizer.layout.block_size):
            view = full[i][key][a:b]
            if owner == optimizer.rank:
                view.copy_(mine[i][key].reshape(-1))
                sent += view.numel() * view.element_size() * (optimizer.world_size - 1)
            if optimizer.world_size > 1:
                buf = view.contiguous()
                dist.broadcast(buf, src=_global(optimizer, owner), group=optimizer.group)
                view.copy_(buf)
    return full, sent


def fp32_state_bytes(optimizer) -> int:
    """Bytes the same state would take in fp32 (one float per element per state tensor)."""
    return 4 * n_states(optimizer.inner.rule) * sum(p.numel for p in optimizer.layout.params)


def collective_device(group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a small tensor for a collective on ``group`` must live: the CPU when the group has gloo
    (alone or beside NCCL), else the current CUDA device (NCCL)."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def wait_for_every_rank(group: dist.ProcessGroup | None, device: torch.device, where: str, hint: str) -> None:
    """A barrier that explains itself: a collective that one rank enters alone (a client calling a
    collective method on rank 0 only) otherwise waits without a word until the process group's
    timeout. After :data:`WAIT_WARN_SECONDS` this warns once, naming ``where`` and ``hint``; if the
    barrier fails (the group's timeout), the error says the same. The barrier is a one-element
    all-reduce on ``device`` (``dist.barrier`` under NCCL would guess a GPU, and warn)."""
    work = dist.all_reduce(torch.zeros(1, device=device), group=group, async_op=True)
    start, warned = time.monotonic(), False
    while not work.is_completed():
        if not warned and time.monotonic() - start > WAIT_WARN_SECONDS:
            rank = dist.get_rank(group)
            warnings.warn(f"rank {rank} has waited {WAIT_WARN_SECONDS:.0f} s in {where} for the other ranks: "
                          f"it is collective, every rank must call it. {hint}", RuntimeWarning, stacklevel=3)
            warned = True
        time.sleep(0.005)
    try:
        work.wait()
    except RuntimeError as exc:
        raise RuntimeError(f"{where}: the other ranks did not join this collective call. {hint}") from exc
