"""dist8.checkpoint when the optimizer state is held by fewer ranks than the world.

The ranks holding one copy of the state are a ``ShardedOptimizer``'s ``process_group``, an FSDP2 model's
mesh, or, for an unsharded optimizer, the rank alone. Several copies are replicas (DDP over every rank)
or pipeline stages holding other parameters. Until 2026-12-04 ``save`` ignored this: two
``ShardedOptimizer`` groups wrote one directory's files at once (sha256 failures at load, or a save that
failed on one group only), and an unsharded or FSDP2 optimizer was written by world rank 0 alone -- a
pipeline stage's own directory was never written, or held rank 0's stage, while ``save`` returned on
every rank; ``load`` refused stages loading their own checkpoints ("different checkpoints").
"""
import torch
import torch.distributed as dist
from torch import nn

import dist8
import dist8.checkpoint as ck
from dist_utils import run_ranks
from fsdp_utils import full_params


# ---- ShardedOptimizer over a process group smaller than the world ---------------------------------------
def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 300), nn.ReLU(), nn.Linear(300, 7))


def _data(step, rank):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(8, 40, generator=gen), torch.randn(8, 7, generator=gen)


GROUP_KW = dict(lr=1e-2, min_8bit_size=1000, percentile_clipping=90)


def _subgroup_worker(rank, world_size, root):
    """Groups [0, 1] and [2, 3]: stage 1 under DDP over all four ranks (ZeRO-1 within a node, replicas across
    nodes) is the plain optimizer under DDP bitwise, and its checkpoint is written once; stage 2 averages
    over its group only, so the groups differ and one directory for both is refused."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    from dist8.shard import ShardedOptimizer

    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    out = {}
    for stage in (1, 2):
        model, ref = _mlp(), _mlp()
        opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, stage=stage, process_group=mine,
                               **GROUP_KW)
        net = DDP(model) if stage == 1 else model
        ref_net, ref_opt = DDP(ref), dist8.AdamW8bit(ref.named_parameters(), **GROUP_KW)
        for step in range(3):
            for m, o in ((net, opt), (ref_net, ref_opt)):
                nn.functional.mse_loss(m(_data(step, rank)[0]), _data(step, rank)[1]).backward()
                o.step()
                o.zero_grad()
        out[stage] = {"as DDP": all(torch.equal(a, b) for a, b in zip(model.parameters(), ref.parameters()))}
        try:
            ck.save(f"{root}/stage{stage}", model, opt, step=3)
            out[stage]["save"] = "ok"
        except ck.CheckpointError as e:
            out[stage]["save"] = str(e)
        if stage == 1:
            fresh = _mlp()
            fresh_opt = ShardedOptimizer(fresh.named_parameters(), dist8.AdamW8bit, stage=1, process_group=mine,
                                         **GROUP_KW)
            ck.load(f"{root}/stage1", fresh, fresh_opt)
            out[1]["loaded"] = all(torch.equal(a, b) for a, b in zip(fresh.parameters(), model.parameters()))
            if rank == 0:
                torch.save({"params": [p.detach() for p in ref.parameters()], "state": ref_opt.state_dict()},
                           f"{root}/ref.pt")
        else:  # a directory per group (groups of tensor or pipeline parallelism hold other parameters)
            ck.save(f"{root}/stage2-group{rank // 2}", model, opt, step=3)
            out[2]["own directory"] = "ok"
    return out


def test_sharded_optimizer_groups_of_a_larger_world_write_one_checkpoint_per_directory(tmp_path):
    root = str(tmp_path)
    res = run_ranks(_subgroup_worker, 4, root, tmp_path=tmp_path)
    for rank, r in enumerate(res):
        # until 2026-12-04 both groups wrote the same files at once: a sha256 failure at load, or a save
        # that failed on one group and succeeded on the other
        assert r[1] == {"as DDP": True, "save": "ok", "loaded": True}, rank
        assert not r[2]["as DDP"] and r[2]["own directory"] == "ok", rank
        assert "ranks [0, 1] and of ranks [2, 3]" in r[2]["save"] and "other parameter values" in r[2]["save"]
    assert not (tmp_path / "stage2").exists()  # refused before anything was written
    model = _mlp()
    opt = dist8.AdamW8bit(model.named_parameters(), **GROUP_KW)
    ck.load(f"{root}/stage1", model, opt)  # the checkpoint of both groups is the DDP run's
    ref = torch.load(f"{root}/ref.pt", weights_only=True)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref["params"]))
    mine, theirs = opt.state_dict()["state"], ref["state"]["state"]
    assert mine.keys() == theirs.keys()
    for k in theirs:
        for key, v in theirs[k].items():
            assert torch.equal(mine[k][key], v) if torch.is_tensor(v) else mine[k][key] == v, (k, key)



# ---- pipeline stages: each stage's ranks save and load their own directory -----------------------------
def _stage_model(stage, fsdp_mesh=None):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(stage)
    width = 300 + 10 * stage  # other parameters on each stage, as pipeline stages hold
    model = nn.Sequential(nn.Linear(40, width), nn.Linear(width, 40))
    if fsdp_mesh is not None:
        fully_shard(model, mesh=fsdp_mesh)
    return model


def _stages_worker(rank, world_size, root):
    """2 stages x 2 ranks: FSDP2 over each stage's 1-D mesh, and an unsharded optimizer whose stage ranks are
    replicas; a directory per stage saves and loads exactly, one directory for both stages is refused."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
    stage = mesh.get_coordinate()[0]
    out = {}
    for kind in ("fsdp2", "plain"):
        dp = mesh["dp"] if kind == "fsdp2" else None
        model = _stage_model(stage, dp)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=100)
        for step in range(2):  # the same batch on a stage's two ranks: the unsharded replicas stay equal
            model(torch.randn(4, 40, generator=torch.Generator().manual_seed(10 * step + stage))).sum().backward()
            opt.step()
            opt.zero_grad()
        try:
            ck.save(f"{root}/{kind}-shared", model, opt, step=2)
            out[f"{kind} shared"] = "saved"
        except ck.CheckpointError as e:
            out[f"{kind} shared"] = str(e)
        ck.save(f"{root}/{kind}-stage{stage}", model, opt, step=2)
        fresh = _stage_model(stage, dp)
        with torch.no_grad():
            for p in fresh.parameters():
                p.zero_()
        fresh_opt = dist8.AdamW8bit(fresh.named_parameters(), lr=1e-2, min_8bit_size=100)
        ck.load(f"{root}/{kind}-stage{stage}", fresh, fresh_opt)
        a, b = full_params(model), full_params(fresh)
        out[f"{kind} params"] = all(torch.equal(a[k], b[k]) for k in a)
        x = torch.randn(4, 40, generator=torch.Generator().manual_seed(99 + stage))
        for m, o in ((model, opt), (fresh, fresh_opt)):  # the loaded state continues as the saved one
            m(x).sum().backward()
            o.step()
        a, b = full_params(model), full_params(fresh)
        out[f"{kind} continues"] = all(torch.equal(a[k], b[k]) for k in a)
    # HSDP on each stage (a 2-D mesh of part of the ranks): no process group spans it, refused naming DCP
    mesh3 = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("pp", "rep", "dp"))
    model = _stage_model(stage, mesh3["rep", "dp"])
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=100)
    try:
        ck.save(f"{root}/hsdp-stage{stage}", model, opt, step=0)
        out["hsdp stage"] = "saved"
    except ck.CheckpointError as e:
        out["hsdp stage"] = str(e)
    return out


def test_pipeline_stages_save_and_load_their_own_directories(tmp_path):
    res = run_ranks(_stages_worker, 4, str(tmp_path), tmp_path=tmp_path)
    for rank, r in enumerate(res):
        for kind in ("fsdp2", "plain"):
            assert r[f"{kind} params"] and r[f"{kind} continues"], (rank, kind)
            assert "save other parameters into one directory" in r[f"{kind} shared"], (rank, kind)
            assert not (tmp_path / f"{kind}-shared").exists()
        assert "a multi-dimensional mesh" in r["hsdp stage"] and "save_dcp" in r["hsdp stage"], rank
    assert not list(tmp_path.glob("*hsdp*"))
    for kind in ("fsdp2", "plain"):  # each stage's directory holds that stage's model
        for stage in (0, 1):
            shapes = {p["name"]: p["shape"] for p in ck.read_metadata(str(tmp_path / f"{kind}-stage{stage}"))["params"]}
            assert shapes["0.weight"] == [300 + 10 * stage, 40], (kind, stage)
