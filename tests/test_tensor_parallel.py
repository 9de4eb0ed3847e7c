"""dist8 optimizers on tensor-parallel DTensor parameters, alone and under FSDP2 on a 2-D mesh (gloo, CPU).

* ``test_tensor_parallel_parameters_in_one_optimizer_step_bitwise`` (2 ranks): ``parallelize_module``
  (ColwiseParallel, RowwiseParallel) in one optimizer: Shard(0)/Shard(1) weights and the
  replicated bias step bitwise as unsharded (AdamW, LAMB with percentile clipping, 32-bit Lion).
  ``test_tensor_parallel_dcp_checkpoint_loads_on_one_rank_and_continues_bitwise``: its DCP
  checkpoint (get_state_dict/set_state_dict) loads on 1 rank and continues bitwise.
* ``test_fsdp_and_tensor_parallel_on_a_2d_mesh_step_bitwise_and_reshard`` (2x2 ranks): FSDP's
  ``_StridedShard`` of TP rows, TP column boxes and replicated biases step bitwise as unsharded
  (AdamW, LAMB with percentile clipping, 32-bit Lion, AdEMAMix) with a NaN skipped by every rank
  holding its block; gradient release and a GradScaler; the DCP and dist8 checkpoints load into
  FSDP alone on 2 ranks and into the plain model.
"""
import copy
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist8
import dist8.checkpoint as ck
from dist_utils import run_ranks
from fsdp_utils import (assert_same_params, assert_same_state, full_params, full_state, mesh_of,
                        steps_as_unsharded, synthetic_grad)

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- tensor parallelism (DTensor Shard(0) / Shard(1) / Replicate on one mesh) ----------------------------------
TP_CASES = {  # one optimizer over all parameters; LAMB and percentile clipping sum norms across ranks
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=1e-3, min_8bit_size=1024)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, min_8bit_size=1024, percentile_clipping=50)),
    "Lion8bit-32bit": (dist8.Lion8bit, dict(lr=1e-3, optim_bits=32, percentile_clipping=50)),
}


def _tensor_parallel_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))

    mesh = init_device_mesh("cpu", (world_size,))
    results = {}
    for name, (cls, kw) in TP_CASES.items():
        model, ref = mlp(), mlp()
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        opt = cls(model.named_parameters(), **kw)  # Shard(0), Shard(0), Shard(1) and the Replicate bias
        ref_opt = cls(ref.named_parameters(), **kw)

        def train(steps):
            for step in steps:
                x = torch.randn(8, 64, generator=torch.Generator().manual_seed(step))
                for m, o in ((model, opt), (ref, ref_opt)):
                    m(x).sum().backward()
                    o.step()
                    o.zero_grad()

        train(range(2))
        # a snapshot loaded back is not stepped by the run that goes on (DTensor state copies out its shard)
        snapshot = copy.deepcopy(opt.state_dict())
        kept = copy.deepcopy(snapshot)
        opt.load_state_dict(snapshot)
        train(range(2, 5))
        results[name] = {
            "same": all(torch.equal(p.full_tensor(), q) for p, q in zip(model.parameters(), ref.parameters())),
            # the gradient-norm history of percentile clipping: global norms, each replica counted once
            "history_same": all(torch.equal(opt.state[p]["gnorm_vec"], ref_opt.state[q]["gnorm_vec"])
                                for p, q in zip(model.parameters(), ref.parameters()) if "gnorm_vec" in opt.state[p]),
            "snapshot_unchanged": all(torch.equal(snapshot["state"][i]["state1"].to_local(), st["state1"].to_local())
                                      for i, st in kept["state"].items()),
            "codes": {n: (str(opt.state[p]["state1"].dtype), tuple(opt.state[p]["state1"].shape))
                      for n, p in model.named_parameters()},
        }
    # a replicated parameter whose replicas are not the ranks the others are sharded over: refused
    mesh2d = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("shard", "alone"))
    sharded = nn.Parameter(DTensor.from_local(torch.randn(8), mesh2d["shard"], [Shard(0)]))
    lonely = nn.Parameter(DTensor.from_local(torch.randn(8), mesh2d["alone"], [Replicate()]))
    try:
        dist8.AdamW8bit([("sharded", sharded), ("lonely", lonely)])
        results["refusal"] = None
    except NotImplementedError as exc:
        results["refusal"] = str(exc)
    return results


def test_tensor_parallel_parameters_in_one_optimizer_step_bitwise(tmp_path):
    """``parallelize_module`` with ColwiseParallel / RowwiseParallel (2 ranks), all parameters in one dist8
    optimizer: the Shard(0) and Shard(1) parameters (8-bit codes of the local shard) and the
    replicated bias step bitwise as the unsharded model's optimizer, also for LAMB's trust ratio and
    percentile clipping (norms summed across ranks, the replicated bias counted once). A replicated
    parameter on other ranks than the sharded ones is refused in one line naming it."""
    for results in run_ranks(_tensor_parallel_worker, 2, tmp_path=tmp_path):
        for name in TP_CASES:
            assert results[name]["same"] and results[name]["snapshot_unchanged"] and results[name]["history_same"], name
        codes = results["AdamW8bit"]["codes"]
        assert codes["0.weight"] == ("torch.uint8", (128, 64)) and codes["2.weight"] == ("torch.uint8", (64, 128))
        assert codes["2.bias"] == ("torch.float32", (64,))  # replicated, whole on each rank (< min_8bit_size)
        refusal = results["refusal"]
        assert refusal is not None and "\n" not in refusal and "lonely" in refusal and "own" in refusal, refusal


def _tensor_parallel_dcp_worker(rank, world_size, path, save):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    if world_size > 1:
        mesh = init_device_mesh("cpu", (world_size,))
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=1024, percentile_clipping=50)

    def train(steps):
        for step in steps:
            model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).sum().backward()
            opt.step()
            opt.zero_grad()

    if save:
        train(range(3))
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
    else:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(range(3, 5))
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def test_tensor_parallel_dcp_checkpoint_loads_on_one_rank_and_continues_bitwise(tmp_path):
    """The tensor-parallel optimizer of the test above (codes of Shard(0) and Shard(1) weights, a replicated
    bias, percentile-clipping history) saved through torch.distributed.checkpoint on 2 ranks loads into
    the plain model on 1 rank, and both continue bitwise alike."""
    path = str(tmp_path / "tp-dcp")
    saved = run_ranks(_tensor_parallel_dcp_worker, 2, path, True, tmp_path=tmp_path)[0]
    loaded = run_ranks(_tensor_parallel_dcp_worker, 1, path, False, tmp_path=tmp_path)[0]
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name


# ---- FSDP + TP on a 2-D mesh (_StridedShard, two Shard placements) ----------------------------------------
TWO_D_CASES = dict(TP_CASES, **{"AdEMAMix8bit": (dist8.AdEMAMix8bit, dict(lr=1e-3, t_alpha=3, t_beta3=3,
                                                                           min_8bit_size=1024))})


def _two_d_model():
    torch.manual_seed(5)
    # 0.weight (200, 64): TP rows 100 per rank, FSDP's strided shard 50 of them (blocks cut mid-row);
    # 2.weight (48, 200): TP columns, FSDP rows: a box that is not a flat range; 2.bias replicated over
    # TP; the LayerNorm only on FSDP's 1-D mesh; 6.weight (16, 512): TP columns of 256, whole blocks
    return nn.Sequential(nn.Linear(64, 200), nn.ReLU(), nn.Linear(200, 48), nn.LayerNorm(48),
                         nn.Linear(48, 512), nn.ReLU(), nn.Linear(512, 16))


def _two_d_parallelize(model, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    parallelize_module(model, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel(),
                                           "4": ColwiseParallel(), "6": RowwiseParallel()})
    fully_shard(model, mesh=mesh["dp"])
    return model


def _box_grads(model, ref, step):
    """Synthetic gradients: each rank gives every parameter the box of the full gradient it holds."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for n, p in model.named_parameters():
        g = synthetic_grad(n, tuple(p.shape), step)
        if step == 1 and n == "0.weight":
            g[7, 3] = float("nan")  # in one rank's box: every rank holding that block must skip it
        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        box = g
        for d, (size, start) in enumerate(zip(shape, offset)):
            box = box.narrow(d, start, size)
        p.grad = DTensor.from_local(box.contiguous(), p.device_mesh, p.placements, run_check=False,
                                    shape=p.shape, stride=p.stride())
        if ref is not None:
            ref[n].grad = g.clone()


def _two_d_worker(rank, world_size, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    out = {}
    for name, (cls, kw) in TWO_D_CASES.items():
        model = _two_d_parallelize(_two_d_model(), mesh)
        opt, ref, ref_opt = steps_as_unsharded(model, cls, kw, _box_grads, name)
        assert ref_opt.nonfinite_skips >= 1, name
        out[name] = {n: (str(p.placements), str(opt.state[p]["state1"].dtype)) for n, p in model.named_parameters()}
        # which path: a shard that is one run of the flattened weight (TP rows) or runs of whole blocks
        # (TP columns) takes the fused kernel, any other box the specification
        out[name]["path"] = {n: "run" if lay.contiguous else "blocks" if lay.block_index is not None else "spec"
                             for n, p in model.named_parameters()
                             for (key, _), lay in opt.dtensor_layouts.items() if key == id(p)}
        if name == "LAMB8bit":  # the percentile history holds global norms, each shard counted once
            out["history"] = all(torch.equal(opt.state[p]["gnorm_vec"], ref_opt.state[ref[n]]["gnorm_vec"])
                                 for n, p in model.named_parameters())
        if name == "AdamW8bit":
            out["reference"] = (full_state(ref_opt), {n: p.detach().clone() for n, p in ref.items()})
            dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
            flat = StateDictOptions(flatten_optimizer_state_dict=True)  # torchtitan's setting
            dcp.save({"optim": get_optimizer_state_dict(model, opt, options=flat)}, checkpoint_id=path + "-flat")
            ck.save(path + "-dist8", model, opt, step=4)  # dist8's format: gathered, world-size independent
    out.update(_two_d_release_and_scaler(mesh, rank))
    return out


def _two_d_release_and_scaler(mesh, rank):
    """With TP's own forward: gradient release steps bitwise as the normal step, and a GradScaler's NaN
    on one rank skips the step on every rank."""
    def build():
        model = _two_d_parallelize(_two_d_model(), mesh)
        return model, dist8.AdamW8bit(model.parameters(), lr=1e-3, min_8bit_size=1024)

    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(rank // 2))  # one batch per FSDP rank
    finals = []
    for release in (False, True):
        model, opt = build()
        handle = dist8.gradient_release(model, opt) if release else None
        for _ in range(3):
            model(x).sum().backward()
            opt.step()
            opt.zero_grad()
        finals.append(full_params(model))
        if handle is not None:
            handle.remove()
    model, opt = build()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step in range(3):
        scaler.scale(model(x).sum()).backward()
        if step == 1 and rank == 3:
            model[2].weight.grad.to_local()[0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return {"release same": all(torch.equal(finals[0][n], finals[1][n]) for n in finals[0]),
            "amp": (opt.amp_skips, scaler.get_scale())}


def _one_d_load_worker(rank, world_size, path):
    """The 2-D checkpoints (DCP nested and flattened, dist8's) into FSDP alone (1-D mesh) or, on one rank,
    the plain model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard

    cls, kw = TWO_D_CASES["AdamW8bit"]

    def fresh():
        model = _two_d_model()
        if world_size > 1:
            fully_shard(model, mesh=mesh_of(world_size))
        return model, cls(model.named_parameters(), **kw)

    out = {}
    for kind, flatten in (("dcp", False), ("dcp flattened", True)):
        model, opt = fresh()
        options = StateDictOptions(flatten_optimizer_state_dict=flatten)
        state = {"optim": get_optimizer_state_dict(model, opt, options=options)}
        dcp.load(state, checkpoint_id=path + ("-flat" if flatten else ""))
        set_optimizer_state_dict(model, opt, state["optim"], options=options)
        out[kind] = full_state(opt)
    model, opt = fresh()
    ck.load(path + "-dist8", model, opt)
    out["dist8"] = (full_state(opt), full_params(model))
    return out


def test_fsdp_and_tensor_parallel_on_a_2d_mesh_step_bitwise_and_reshard(tmp_path):
    """FSDP + TP (torchtitan's 2-D layout, 2x2 gloo ranks): FSDP's strided shard of TP's row shard, a box of
    TP columns x FSDP rows, TP-replicated biases and FSDP-only norms in one optimizer step bitwise as the
    unsharded optimizer (8-bit codes, edge blocks, a NaN skipped by every rank holding its block, LAMB's
    norms and percentile clipping summed with each shard once; gradient release as the normal step, a
    GradScaler NaN on one rank skipping everywhere); the DCP checkpoint loads exactly into
    FSDP alone on 2 ranks and into the plain model on 1 rank (also flattened, torchtitan's setting), and so
    does dist8's own checkpoint."""
    path = str(tmp_path / "2d-dcp")
    results = run_ranks(_two_d_worker, 4, path, tmp_path=tmp_path)
    res = results[0]
    assert res["AdamW8bit"]["0.weight"] == ("(_StridedShard(dim=0, sf=2), Shard(dim=0))", "torch.uint8")
    assert res["AdamW8bit"]["2.weight"] == ("(Shard(dim=0), Shard(dim=1))", "torch.uint8")
    assert res["AdamW8bit"]["path"] == {"0.weight": "run", "0.bias": "run", "2.weight": "spec", "2.bias": "run",
                                        "3.weight": "run", "3.bias": "run", "4.weight": "run", "4.bias": "run",
                                        "6.weight": "blocks", "6.bias": "run"}
    assert all(r["history"] and r["release same"] and r["amp"] == (1, 512.0) for r in results)
    want_state, want_params = res["reference"]
    for world_size in (2, 1):
        loaded = run_ranks(_one_d_load_worker, world_size, path, tmp_path=tmp_path)[0]
        assert_same_state(loaded["dcp"], want_state, f"2-D DCP checkpoint loaded on {world_size} rank(s)")
        assert_same_state(loaded["dcp flattened"], want_state, f"2-D flattened DCP checkpoint on {world_size} rank(s)")
        assert_same_state(loaded["dist8"][0], want_state, f"2-D dist8 checkpoint loaded on {world_size} rank(s)")
        assert_same_params(loaded["dist8"][1], want_params, f"2-D dist8 checkpoint loaded on {world_size} rank(s)")


# ---- uneven Shard(1) boxes: one update path on every rank ------------------------------------------------------
def _uneven_column_boxes(rank, world_size):
    import faulthandler

    from torch.distributed.tensor import Shard, distribute_tensor

    faulthandler.dump_traceback_later(120, exit=True)  # a rank left waiting: a failure, not a 15-minute hang
    mesh = mesh_of(world_size)
    out = {}
    for shape in [(4, 2, 32), (2, 8, 32)]:  # Shard(1) on 3 ranks: 1/1/0 and 3/3/2 columns of 32 values
        torch.manual_seed(0)
        full = torch.randn(*shape)
        p = nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(1)]))
        ref = nn.Parameter(full.clone())
        kw = dict(lr=1e-2, min_8bit_size=1, block_size=64)
        opt, ref_opt = dist8.AdamW8bit([("w", p)], **kw), dist8.AdamW8bit([("w", ref)], **kw)
        for step in range(3):
            g = synthetic_grad("w", shape, step)
            p.grad = distribute_tensor(g, mesh, [Shard(1)], src_data_rank=None)
            ref.grad = g.clone()
            opt.step()
            ref_opt.step()
        out[shape] = torch.equal(p.full_tensor(), ref.detach())
    return out


def test_uneven_column_boxes_take_one_update_path_on_every_rank(tmp_path):
    """A Shard(1) parameter whose boxes are whole-block runs on some ranks only (uneven columns, an empty
    box): those ranks took the fused kernel, the others the specification path, whose edge all-reduce they
    then waited in forever. The path is decided from every rank's box now; bitwise the unsharded run."""
    for result in run_ranks(_uneven_column_boxes, 3, tmp_path=tmp_path):
        assert all(result.values()), result
