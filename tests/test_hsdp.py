"""Replicated parameters: HSDP (FSDP2 on a 2-D mesh, replicate x shard), tensor parallelism's replicated
parameters, and the non-finite skip counts of every sharded layout.

The docstring of :mod:`dist8.optim.dtensor` allowed HSDP's ``Replicate`` mesh dimension, but no test built
one. Here a (2, 2) mesh steps bitwise as the unsharded optimizer (fp32, and bf16 with 24-bit masters), and
its ``dist8.checkpoint`` and DCP checkpoints load on a 1-D mesh of 4 ranks and on another (2, 2) mesh,
exactly.

Skip counts: the README promises that ``opt.nonfinite_skips`` summed over ranks is the unsharded run's
count. Until 2026-12-04 that held only for the default ``on_nonfinite="skip"`` on plain FSDP2 and
``ShardedOptimizer``: HSDP's replicas and tensor parallelism's replicated parameters each counted the
blocks they skipped (2x with two replicas), and a parameter skipped whole (``"skip_param"``) was counted
by every rank holding part of it (4x on 4 FSDP2 ranks; once per piece under ``ShardedOptimizer``).
"""
import torch
import torch.distributed as dist
from torch import nn

import dist8
import dist8.checkpoint as ck
from dist_utils import run_ranks
from fsdp_utils import assert_same_state, full_state, reference_copy, set_grads, steps_as_unsharded, synthetic_grad


class Wide(nn.Module):
    """Uneven rows, a parameter whose every shard edge cuts a block, an empty shard starting mid-block."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(100, 33)
        self.b = nn.Linear(33, 70)
        self.c = nn.Parameter(torch.randn(5000))
        self.d = nn.Parameter(torch.randn(2, 1100))
        self.to(dtype)

    def forward(self, x):
        return self.b(self.a(x)).sum() + self.c.sum() + self.d.sum()


KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=2000, percentile_clipping=90)


def _hsdp(mesh, dtype=torch.float32):
    from torch.distributed.fsdp import fully_shard

    model = Wide(dtype)
    for m in (model.a, model.b):
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _grads16(model, ref, step):
    """``set_grads`` in the parameters' 16-bit dtype (no inf/NaN: a bf16 run's skips are tested in fp32)."""
    from torch.distributed.tensor import distribute_tensor

    for n, p in model.named_parameters():
        g = synthetic_grad(n, tuple(p.shape), step).to(p.dtype)
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        ref[n].grad = g.clone()


def _hsdp_worker(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh

    from dist8.integrations.fsdp import load_dcp, save_dcp

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    out = {}
    model = _hsdp(mesh)
    out["placements"] = str(model.a.weight.placements)
    # set_grads puts a NaN into c and an inf into b.weight at step 1: every replica skips those blocks,
    # the counts summed over the 4 ranks (checked inside) equal the unsharded run's
    opt, ref, ref_opt = steps_as_unsharded(model, dist8.AdamW8bit, KW, set_grads, "HSDP fp32")
    out["unsharded skips"] = ref_opt.nonfinite_skips
    ck.save(root, model, opt, step=4)
    save_dcp(root + "-dcp", model, opt)
    for shape in ((4,), (2, 2)):
        names = ("replicate", "shard") if len(shape) == 2 else None
        for how, load in (("dist8.checkpoint", ck.load), ("DCP", load_dcp)):
            fresh = _hsdp(init_device_mesh("cpu", shape, mesh_dim_names=names))
            fresh_opt = dist8.AdamW8bit(fresh.named_parameters(), **KW)
            load(root if how == "dist8.checkpoint" else root + "-dcp", fresh, fresh_opt)
            assert_same_state(full_state(fresh_opt), full_state(ref_opt), f"HSDP {how} checkpoint loaded on {shape}")

    model16 = _hsdp(mesh, torch.bfloat16)
    opt16, _, _ = steps_as_unsharded(model16, dist8.AdamW8bit, dict(KW, master_weight_bits=24), _grads16, "HSDP bf16")
    out["correction"] = str(opt16.state[model16.c]["correction"].dtype)
    return out


def test_hsdp_steps_as_unsharded_and_its_checkpoint_loads_on_other_meshes(tmp_path):
    res = run_ranks(_hsdp_worker, 4, str(tmp_path / "ckpt"), tmp_path=tmp_path)
    assert res[0] == res[3]
    assert res[0]["placements"] == "(Replicate(), Shard(dim=0))"
    assert res[0]["unsharded skips"] == 2  # c's block and b.weight's
    assert res[0]["correction"] == "torch.int8"


# ---- skip counts summed over ranks, every layout ------------------------------------------------------
def _nonfinite_grads(model):
    grads = {}
    for n, p in model.named_parameters():
        g = synthetic_grad(n, tuple(p.shape), 0)
        if n == "c":
            g[0], g[4000] = float("nan"), float("inf")  # two blocks, on the first and the last of 4 shards
        if n == "a.bias":
            g[3] = float("nan")  # one block, held whole by one rank
        grads[n] = g
    return grads


def _counts(opt):
    """(sum over ranks of ``nonfinite_skips``, the per-parameter counts summed over ranks)."""
    names = sorted(n for n, _ in Wide().named_parameters())
    per = torch.tensor([opt.nonfinite_skips] + [opt.nonfinite_skips_by_param().get(n, 0) for n in names])
    dist.all_reduce(per)
    return int(per[0]), {n: int(c) for n, c in zip(names, per[1:].tolist()) if c}


def _skip_count_worker(rank, world_size, mode):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, distribute_tensor

    from dist8.shard import ShardedOptimizer

    kw = dict(lr=1e-2, min_8bit_size=0, on_nonfinite=mode)
    out = {}
    for layout in ("FSDP2 (4,)", "HSDP (2, 2)", "tensor-parallel replicated", "ShardedOptimizer 1",
                   "ShardedOptimizer 2"):
        model = Wide()
        grads = _nonfinite_grads(model)
        if layout.startswith("ShardedOptimizer"):
            opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=int(layout[-1]), **kw)
            model(torch.randn(2, 100)).backward()
            opt.zero_grad()
            for n, p in model.named_parameters():
                p.grad = grads[n].clone()
        else:
            if layout.startswith("HSDP"):
                mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            else:
                mesh = init_device_mesh("cpu", (world_size,))
            if layout.startswith("FSDP2") or layout.startswith("HSDP"):
                fully_shard(model, mesh=mesh)
            else:
                for name, p in list(model.named_parameters()):
                    owner, _, attr = name.rpartition(".")
                    setattr(model.get_submodule(owner), attr,
                            nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()])))
            opt = dist8.AdamW8bit(model.named_parameters(), **kw)
            for n, p in model.named_parameters():
                p.grad = distribute_tensor(grads[n], p.device_mesh, p.placements, src_data_rank=None)
        opt.step()
        out[layout] = _counts(opt)
    return out


def _unsharded_counts(mode):
    model = Wide()
    ref = reference_copy(model)
    opt = dist8.AdamW8bit(list(ref.items()), lr=1e-2, min_8bit_size=0, on_nonfinite=mode)
    for n, g in _nonfinite_grads(model).items():
        ref[n].grad = g
    opt.step()
    return opt.nonfinite_skips, opt.nonfinite_skips_by_param()


def test_skip_counts_summed_over_ranks_are_the_unsharded_counts_in_every_layout(tmp_path):
    for mode, want in (("skip", (3, {"a.bias": 1, "c": 2})), ("skip_param", (2, {"a.bias": 1, "c": 1}))):
        assert _unsharded_counts(mode) == want, mode
        for layout, got in run_ranks(_skip_count_worker, 4, mode, tmp_path=tmp_path)[0].items():
            assert got == want, f"on_nonfinite={mode!r}, {layout}: {got} summed over 4 ranks, unsharded {want}"

