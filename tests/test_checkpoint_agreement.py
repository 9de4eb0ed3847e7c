"""dist8.checkpoint.load on several ranks: every rank loads the same checkpoint, and FSDP2 ranks load what
one process loads (a parameter without optimizer state too)."""
import copy
import shutil

import pytest
import torch
import torch.distributed as dist

import dist8
import dist8.checkpoint as ck
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks
from fsdp_utils import DcpModel, assert_same_params, full_params, mesh_of, synthetic_grad

HANG_S = 60


def _same(a, b):
    """Deep bitwise equality of states / lists of tensors."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _sharded():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    return model, ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2, min_8bit_size=0)


def _train(model, opt, steps):
    for k in steps:
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(k))).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _given_different_checkpoints(rank, world_size, root):
    import faulthandler

    faulthandler.dump_traceback_later(HANG_S, exit=True)
    model, opt = _sharded()
    _train(model, opt, [0])
    ck.save(f"{root}/step1", model, opt, step=1)
    _train(model, opt, [1])
    ck.save(f"{root}/step2", model, opt, step=2)
    if rank == 0:  # the same checkpoint under another path (another node's disk) is the same checkpoint
        shutil.copytree(f"{root}/step1", f"{root}/copy-of-step1")
    dist.barrier()
    mine, opt2 = _sharded()
    _train(mine, opt2, [5])  # state to keep: the refused load must not touch it
    before = copy.deepcopy(opt2.shard_state()), [p.detach().clone() for p in mine.parameters()]
    with pytest.raises(ck.CheckpointError) as refused:
        ck.load(f"{root}/step1" if rank == 0 else f"{root}/step2", mine, opt2)
    unchanged = _same(before, (opt2.shard_state(), [p.detach() for p in mine.parameters()]))
    ck.load(f"{root}/step1" if rank == 0 else f"{root}/copy-of-step1", mine, opt2)
    return {"error": str(refused.value), "unchanged": unchanged}


def test_ranks_given_different_checkpoints_refuse_on_every_rank(tmp_path):
    """Rank 0 given step 1 and rank 1 step 2 (latest() on node-local disks) each loaded its own and trained on
    as a patchwork of two runs. Now every rank refuses, naming both, before anything is installed; the same
    checkpoint under two paths still loads."""
    results = run_ranks(_given_different_checkpoints, 2, str(tmp_path / "ck"), tmp_path=tmp_path)
    for rank, res in enumerate(results):
        error = res["error"]
        assert error.startswith("the ranks were given different checkpoints: "), (rank, error)
        assert "rank 0 loads " in error and "step1 (step 1," in error, (rank, error)
        assert "rank 1 loads " in error and "step2 (step 2," in error, (rank, error)
        assert "\n" not in error and res["unchanged"], (rank, res)


def _grads(model, step, sharded):
    """Synthetic gradients for every parameter but ``e`` (an expert no token was routed to)."""
    from torch.distributed.tensor import distribute_tensor

    for name, p in model.named_parameters():
        if name == "e":
            p.grad = None
            continue
        g = synthetic_grad(name, tuple(p.shape), step)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if sharded else g


def _steps(model, opt, steps, sharded):
    for step in steps:
        _grads(model, step, sharded)
        opt.step()
        opt.zero_grad()


def _with_state_for_e(sharded, world_size):
    """A fresh model whose optimizer has state for ``e``: none of it may survive a load of a checkpoint
    holding none (the checkpoint's state, as load_state_dict gives it)."""
    from torch.distributed.fsdp import fully_shard

    model = DcpModel()
    if sharded:
        fully_shard(model, mesh=mesh_of(world_size))
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    opt.zero_grad()
    assert opt.state[model.e]
    return model, opt


def _fsdp2_unused_parameter(rank, world_size, path):
    import faulthandler

    faulthandler.dump_traceback_later(HANG_S, exit=True)
    from torch.distributed.fsdp import fully_shard

    model = DcpModel()
    fully_shard(model, mesh=mesh_of(world_size))
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0)
    _steps(model, opt, [0, 1], sharded=True)
    ck.save(path, model, opt, step=2)
    model, opt = _with_state_for_e(True, world_size)
    ck.load(path, model, opt)
    no_state_for_e = not opt.state.get(model.e)
    _steps(model, opt, [2, 3], sharded=True)
    return {"params": full_params(model), "no_state_for_e": no_state_for_e}


def test_fsdp2_loads_a_checkpoint_without_state_for_a_parameter(tmp_path):
    """A parameter that never got a gradient has no optimizer state in the checkpoint: torch's
    set_optimizer_state_dict refused it on FSDP2 ranks (its StateDictOptions(strict=False), which dist8
    users cannot pass), while one process loaded it. Now FSDP2 ranks load it and continue as one process
    does, with no state for the parameter even where the loading optimizer had some."""
    path = str(tmp_path / "ck")
    results = run_ranks(_fsdp2_unused_parameter, 2, path, tmp_path=tmp_path)
    model, opt = _with_state_for_e(False, 1)
    ck.load(path, model, opt)
    assert not opt.state.get(model.e)
    _steps(model, opt, [2, 3], sharded=False)
    for rank, res in enumerate(results):
        assert res["no_state_for_e"], rank
        assert_same_params(res["params"], full_params(model), f"FSDP2 rank {rank} vs one process")


def _late_rank_checkpoint(rank, world_size, root):
    import faulthandler
    import time
    import warnings

    from dist8.shard import collectives

    faulthandler.dump_traceback_later(HANG_S, exit=True)
    collectives.WAIT_WARN_SECONDS = 1.0
    model, opt = _sharded()
    _train(model, opt, [0])
    caught = {}
    for what, call in (("save", lambda: ck.save(f"{root}/ck", model, opt, step=1)),
                       ("load", lambda: ck.load(f"{root}/ck", model, opt))):
        if rank == 1:
            time.sleep(4.0)  # as a rank that skips the call (`if rank == 0: save(...)`) would, for a while
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            call()
        caught[what] = [str(w.message) for w in seen if issubclass(w.category, RuntimeWarning)]
    return caught


def test_a_rank_that_saves_or_loads_alone_says_why_it_waits(tmp_path):
    """save and load are collective; torch.save's habit (`if rank == 0: save(...)`) left rank 0 waiting in
    the first collective without a word until the process group's timeout. It warns after
    ``collectives.WAIT_WARN_SECONDS`` naming the call and the fix; the rank that comes late does not."""
    warned = run_ranks(_late_rank_checkpoint, 2, str(tmp_path), tmp_path=tmp_path)
    assert warned[1] == {"save": [], "load": []}
    for what in ("save", "load"):
        assert len(warned[0][what]) == 1, warned[0]
        message = warned[0][what][0]
        assert message.startswith(f"rank 0 has waited 1 s in dist8.checkpoint.{what}() for the other ranks"), message
        assert "every rank must call it" in message and "not under `if rank == 0`" in message
