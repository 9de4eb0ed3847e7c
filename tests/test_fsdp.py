"""dist8 optimizers on FSDP2 (``fully_shard``) models, gloo ranks on CPU.

What the tests prove:

* ``test_fsdp2_training_matches_single_process`` (2 ranks): 20 steps of a tiny
  GPT-like model (Embedding, LayerNorm, Linear) with AdamW8bit, Lion8bit and
  SGD8bit. Every step the FSDP2 optimizer's parameters and full state (codes +
  absmax) are *bitwise* equal to the unsharded optimizer fed the same averaged
  gradients (the FSDP2 gradients gathered); the loss curve equals a
  single-process run on the whole batch within 5e-4 relative (measured: 8e-6) (only the gradient
  reduction order differs); state is uint8 codes of the local shard's shape.
  Also once with a bf16 ``MixedPrecisionPolicy`` (bitwise vs unsharded again).
* ``test_all_optimizers_exact_on_uneven_and_shard1`` (3 ranks): all eight
  ``*8bit`` optimizers, with uneven ``Shard(0)`` shards whose edges cut
  quantization blocks, a ``Shard(1)`` parameter (``shard_placement_fn``),
  percentile clipping (LAMB, Adam) and block_wise=False (RMSprop): bitwise equal
  to the unsharded optimizer; min_8bit_size decided on the global size;
  StableEmbedding keeps 32-bit state under FSDP2; FSDP1 is refused clearly.
* ``test_dcp_reshard`` (world sizes 3, 4, 2, 1, 3 in turn): ``save_dcp`` then
  ``load_dcp`` across 3->4, 4->2, 2->1, 2->3 (and so 3->4, 4->2, 2->1, 2->3 cover
  the required 2->1, 2->3, 4->2, 3->4), with Linear(100, 128) and Linear(128, 33)
  (uneven rows, rows not a multiple of the block, a (33,) bias in one block
  shared by all ranks). The checkpoint holds uint8 codes and fp32 absmax only.
  Loading is *exact everywhere* (the state is defined on the global parameter,
  absmax is stored full length): the loaded state is bitwise the saved one and 5
  more steps are bitwise equal to an uninterrupted run, both the unsharded one
  and an uninterrupted FSDP2 run on the new world size.
* ``test_tensor_parallel_parameters_in_one_optimizer_step_bitwise`` (2 ranks): ``parallelize_module``
  (ColwiseParallel, RowwiseParallel) in one optimizer: Shard(0)/Shard(1) weights and the
  replicated bias step bitwise as unsharded (AdamW, LAMB with percentile clipping, 32-bit Lion).
  ``test_tensor_parallel_dcp_checkpoint_loads_on_one_rank_and_continues_bitwise``: its DCP
  checkpoint (get_state_dict/set_state_dict) loads on 1 rank and continues bitwise.
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
from fsdp_utils import (MORE, SAVE_AT, assert_same_params, assert_same_state, batch, dcp_model,
                        full_params, full_state, loss_fn, make_model, mesh_of, reference_copy, reference_run, run_steps,
                        set_grads, synthetic_grad)

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- FSDP2 training vs unsharded / single process ------------------------------------------------
TRAIN_OPTS = {
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=3e-3, weight_decay=0.1, min_8bit_size=1000)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=2e-3, weight_decay=0.1, min_8bit_size=1000)),
    "SGD8bit": (dist8.SGD8bit, dict(lr=0.05, momentum=0.9, min_8bit_size=1000)),
}
STEPS = 20


def _train_worker(rank, world_size, cases):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = mesh_of(world_size)
    results = {}
    for case, (opt_name, bf16) in cases.items():
        cls, kw = TRAIN_OPTS[opt_name]
        model = make_model()
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
            else MixedPrecisionPolicy()
        fully_shard(model, mesh=mesh, mp_policy=policy)
        ref = reference_copy(model)
        opt = cls(model.named_parameters(), **kw)
        ref_opt = cls(list(ref.items()), **kw)
        losses = []
        for step in range(STEPS):
            x, y = batch(step)
            per = x.shape[0] // world_size
            loss = loss_fn(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            loss.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            losses.append(float(mean) / world_size)
            for n, p in model.named_parameters():
                ref[n].grad = p.grad.full_tensor()
            opt.step()
            ref_opt.step()
            opt.zero_grad()
            ref_opt.zero_grad()
            assert_same_params(full_params(model), {n: p.detach() for n, p in ref.items()}, f"{case} step {step}")
        assert_same_state(full_state(opt), full_state(ref_opt), case)
        kinds = {}
        for n, p in model.named_parameters():
            st = opt.state[p]
            assert st["state1"].shape == p.to_local().shape, n
            assert not hasattr(st["state1"], "full_tensor"), "state in memory must be plain local tensors"
            kinds[n] = str(st["state1"].dtype)
        results[case] = {"losses": losses, "kinds": kinds}
    return results


def _single_process_losses(opt_name):
    cls, kw = TRAIN_OPTS[opt_name]
    model = make_model()
    opt = cls(model.named_parameters(), **kw)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        loss = loss_fn(model, x, y)
        loss.backward()
        losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad()
    return losses


def test_fsdp2_training_matches_single_process(tmp_path):
    cases = {name: (name, False) for name in TRAIN_OPTS}
    cases["AdamW8bit-bf16"] = ("AdamW8bit", True)
    results = run_ranks(_train_worker, 2, cases, tmp_path=tmp_path)
    for case in cases:  # losses are all-reduced: identical on both ranks
        assert results[0][case]["losses"] == results[1][case]["losses"]
    for case, (opt_name, bf16) in cases.items():
        kinds = results[0][case]["kinds"]
        big = ("fc1.weight", "fc2.weight", "head.weight", "tok.weight")
        assert {kinds[n] for n in big} == {"torch.uint8"}, kinds
        assert kinds["fc1.bias"] == kinds["pos"] == "torch.float32"  # below min_8bit_size (global size)
        if bf16:
            continue
        single = _single_process_losses(opt_name)
        fsdp = results[0][case]["losses"]
        assert fsdp[-1] < fsdp[0] * 0.95, f"{case} did not train: {fsdp}"
        for step, (a, b) in enumerate(zip(fsdp, single)):
            assert abs(a - b) <= 5e-4 * abs(b), f"{case} step {step}: FSDP2 loss {a} vs single process {b}"


# ---- all optimizers, uneven Shard(0), Shard(1), StableEmbedding, FSDP1 ------------------------------
ALL_OPTS = {
    "Adam8bit": (dist8.Adam8bit, dict(lr=1e-2, weight_decay=0.01, percentile_clipping=90)),
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=1e-2, weight_decay=0.1)),
    "SGD8bit": (dist8.SGD8bit, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=1e-3, weight_decay=0.1, maximize=True)),  # the sign on DTensor shards
    "RMSprop8bit": (dist8.RMSprop8bit, dict(lr=1e-3, alpha=0.9, block_wise=False)),
    "Adagrad8bit": (dist8.Adagrad8bit, dict(lr=1e-2)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, weight_decay=0.01, percentile_clipping=95, maximize=True)),
    "LARS8bit": (dist8.LARS8bit, dict(lr=1e-1, momentum=0.9, weight_decay=1e-4)),
    "AdEMAMix8bit": (dist8.AdEMAMix8bit, dict(lr=1e-2, t_alpha=3, t_beta3=3)),  # three states at the edges
}


def _steps_as_unsharded(model, cls, kw, set_grads_fn, name, steps=4):
    """Step the sharded ``model`` and an unsharded copy with the same gradients: parameters after every
    step, then state and skip counts (summed over ranks) bitwise equal. Returns (opt, ref, ref_opt)."""
    ref = reference_copy(model)
    opt = cls(model.named_parameters(), **kw)
    ref_opt = cls(list(ref.items()), **kw)
    for step in range(steps):
        set_grads_fn(model, ref, step)
        opt.step()
        ref_opt.step()
        assert_same_params(full_params(model), {n: p.detach() for n, p in ref.items()}, f"{name} step {step}")
    # each rank counts the blocks it skipped (an edge block on the rank holding its first element)
    skips = torch.tensor([opt.nonfinite_skips], dtype=torch.int64)
    dist.all_reduce(skips)
    assert int(skips) == ref_opt.nonfinite_skips, f"{name}: {int(skips)} skips over ranks"
    assert_same_state(full_state(opt), full_state(ref_opt), name)
    return opt, ref, ref_opt


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(100, 33)  # (33, 100): rows 11 per rank on 3 ranks, edges at 1100, 2200
        self.b = nn.Linear(33, 70)  # (70, 33): Shard(1) below; 24/24/22 rows under Shard(0)
        self.c = nn.Parameter(torch.randn(5000))  # 1667/1667/1666: every edge cuts a block
        # fewer rows than ranks (1/1/0): rank 2's shard is empty and starts mid-block (2200 % 256)
        self.d = nn.Parameter(torch.randn(2, 1100))
        self.e = nn.Parameter(torch.randn(6, 768))  # Shard(1): 256 columns per rank, runs of whole blocks


SHARD1 = ((70, 33), (6, 768))  # the Wide parameters sharded on their columns


def _all_opts_worker(rank, world_size):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    from dist8.integrations import fsdp as d8fsdp

    mesh = mesh_of(world_size)
    out = {}
    for name, (cls, kw) in ALL_OPTS.items():
        model = Wide()
        fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.shape in SHARD1 else Shard(0))
        assert model.b.weight.placements == (Shard(1),)
        kw = dict(kw, min_8bit_size=2000)
        opt, ref, ref_opt = _steps_as_unsharded(model, cls, kw, set_grads, name)
        assert ref_opt.nonfinite_skips == 1, name
        out[name] = {n: str(opt.state[p]["state1"].dtype) for n, p in model.named_parameters()}
        if name == "AdamW8bit":
            out["e on whole blocks"] = any(lay.block_index is not None for (key, _), lay in opt.dtensor_layouts.items()
                                           if key == id(model.e))
            _state_dict_interop(model, opt, ref, ref_opt, mesh, cls, kw)
            groups = len(opt.param_groups)
            with pytest.raises(TypeError, match="is a plain tensor.*DTensors"):
                opt.add_param_group({"params": [nn.Parameter(torch.randn(4))]})  # mixing plain and DTensor
            assert len(opt.param_groups) == groups  # refused before anything was added

    # A gradient from DTensor ops on the sharded parameter itself (a penalty outside forward): DTensor lays
    # the gradient of this uneven Shard(0) parameter out otherwise (Replicate, with torch 2.13); the step
    # redistributes it for itself
    # and leaves .grad as it was (the second backward accumulates into it, as without dist8).
    model = Wide()
    fully_shard(model, mesh=mesh)
    ref = reference_copy(model)
    opt, ref_opt = dist8.AdamW8bit([model.d], lr=1e-2), dist8.AdamW8bit([ref["d"]], lr=1e-2)
    for step in range(2):
        (model.d ** 2).sum().backward()
        (ref["d"] ** 2).sum().backward()
        out["penalty grad"] = str(model.d.grad.placements)
        opt.step()
        ref_opt.step()
        assert str(model.d.grad.placements) == out["penalty grad"]
        assert torch.equal(model.d.grad.full_tensor(), ref["d"].grad)
    assert torch.equal(model.d.full_tensor(), ref["d"].detach())

    # StableEmbedding under FSDP2: the mark is lost by fully_shard; dist8's fully_shard and prepare() keep it.
    for how in ("dist8.fully_shard", "prepare"):
        model = make_model(stable=True, vocab=200)
        if how == "prepare":
            fully_shard(model, mesh=mesh)
            d8fsdp.prepare(model)
        else:
            d8fsdp.fully_shard(model, mesh=mesh)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=1000)
        loss_fn(model, *batch(0)).backward()
        opt.step()
        out[how] = {n: str(opt.state[p]["state1"].dtype) for n, p in model.named_parameters()}

    # FSDP1 flat parameters: a clear error naming FSDP2 and ShardedOptimizer.
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    errors = []
    for orig in (False, True):
        wrapped = FSDP(nn.Linear(100, 50), device_id=torch.device("cpu"), use_orig_params=orig)
        with pytest.raises(TypeError, match=r"FSDP1.*fully_shard \(FSDP2\).*ShardedOptimizer") as info:
            dist8.AdamW8bit(wrapped.parameters())
        errors.append(str(info.value))
        with pytest.raises(TypeError, match="FSDP1"):
            d8fsdp.prepare(wrapped)
    out["fsdp1"] = errors
    return out


def _state_dict_interop(model, opt, ref, ref_opt, mesh, cls, kw):
    """Full (gathered) state dicts and plain <-> FSDP2 state dicts load exactly."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    expected = full_state(ref_opt)
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    st = full["state"]["a.weight"]
    assert st["state1"].shape == (33, 100) and st["absmax1"].shape == (13,)  # full codes, full absmax

    def fresh():
        m = Wide()
        fully_shard(m, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.shape in SHARD1 else Shard(0))
        return m, cls(m.named_parameters(), **kw)

    m2, o2 = fresh()
    set_optimizer_state_dict(m2, o2, full, options=StateDictOptions(full_state_dict=True))
    assert_same_state(full_state(o2), expected, "full state dict round trip")
    m3, o3 = fresh()
    o3.load_state_dict(ref_opt.state_dict())  # unsharded optimizer's state dict into FSDP2
    assert_same_state(full_state(o3), expected, "unsharded -> FSDP2 state dict")
    plain = cls(list(reference_copy(model).items()), **kw)
    plain.load_state_dict(opt.state_dict())  # FSDP2 state dict into an unsharded optimizer
    assert_same_state(full_state(plain), expected, "FSDP2 -> unsharded state dict")


def test_all_optimizers_exact_on_uneven_and_shard1(tmp_path):
    results = run_ranks(_all_opts_worker, 3, tmp_path=tmp_path)
    res = results[0]
    for name in ALL_OPTS:
        # min_8bit_size=2000 on the global size: a.weight (3300) and c (5000) are 8-bit although every
        # local shard (1100, 1667) is smaller; b.weight (2310) too; biases stay 32-bit.
        assert res[name] == {"a.weight": "torch.uint8", "a.bias": "torch.float32", "b.weight": "torch.uint8",
                             "b.bias": "torch.float32", "c": "torch.uint8", "d": "torch.uint8",
                             "e": "torch.uint8"}, name
    for how in ("dist8.fully_shard", "prepare"):
        assert res[how]["tok.weight"] == "torch.float32", how  # StableEmbedding: 32-bit state
        assert res[how]["tok.norm.weight"] == "torch.float32"
        assert res[how]["fc1.weight"] == res[how]["head.weight"] == "torch.uint8"
    assert "dist8.ShardedOptimizer" in res["fsdp1"][0]
    assert res["e on whole blocks"]  # Shard(1) with 256 columns per rank: the fused kernel
    assert res["penalty grad"] != "(Shard(dim=0),)"  # not the parameter's placement: redistributed by the step


# ---- DCP save / load at another world size -------------------------------------------------------
def _dcp_worker(rank, world_size, root, load_from, save):
    from dist8.integrations.fsdp import load_dcp, save_dcp

    ref = reference_run(SAVE_AT + MORE)
    out = {}
    if load_from is not None:
        model, opt = dcp_model(world_size)
        load_dcp(os.path.join(root, f"ws{load_from}"), model, opt)
        # The loaded state is bitwise the state saved at another world size.
        assert_same_params(full_params(model), ref[SAVE_AT][0], f"params loaded {load_from}->{world_size}")
        assert_same_state(full_state(opt), ref[SAVE_AT][1], f"state loaded {load_from}->{world_size}")
        for p in model.parameters():
            assert opt.state[p]["state1"].dtype == torch.uint8 and opt.state[p]["state1"].shape == p.to_local().shape
        run_steps(model, opt, SAVE_AT, SAVE_AT + MORE)
        resumed = (full_params(model), full_state(opt))
        # Uninterrupted FSDP2 run on this world size, and the unsharded run: both bitwise equal.
        model2, opt2 = dcp_model(world_size)
        run_steps(model2, opt2, 0, SAVE_AT + MORE)
        for where, (params, state) in {"unsharded": ref[SAVE_AT + MORE],
                                       f"fsdp ws{world_size}": (full_params(model2), full_state(opt2))}.items():
            assert_same_params(resumed[0], params, f"{load_from}->{world_size} +{MORE} steps vs {where}")
            assert_same_state(resumed[1], state, f"{load_from}->{world_size} +{MORE} steps vs {where}")
        out["loaded"] = load_from
    if save:
        model, opt = dcp_model(world_size)
        run_steps(model, opt, 0, SAVE_AT)
        save_dcp(os.path.join(root, f"ws{world_size}"), model, opt)
        dist.barrier()
        if rank == 0:
            from torch.distributed.checkpoint import FileSystemReader

            meta = FileSystemReader(os.path.join(root, f"ws{world_size}")).read_metadata()
            out["dtypes"] = {k: str(v.properties.dtype) for k, v in meta.state_dict_metadata.items()
                             if k.startswith("optim.state.") and hasattr(v, "properties")}
    return out


def test_dcp_reshard(tmp_path):
    root = str(tmp_path)
    # (world size, load the checkpoint saved at, save a checkpoint)
    plan = [(3, None, True), (4, 3, True), (2, 4, True), (1, 2, False), (3, 2, False)]
    for world_size, load_from, save in plan:
        results = run_ranks(_dcp_worker, world_size, root, load_from, save, tmp_path=tmp_path)
        assert results[0].get("loaded") == load_from
        if save:
            dtypes = results[0]["dtypes"]
            codes = {k: v for k, v in dtypes.items() if ".state1" in k or ".state2" in k}
            absmax = {k: v for k, v in dtypes.items() if ".absmax" in k}
            assert len(codes) == 10 and set(codes.values()) == {"torch.uint8"}, dtypes
            assert len(absmax) == 10 and set(absmax.values()) == {"torch.float32"}, dtypes
            assert not any(k.endswith(("exp_avg", "exp_avg_sq")) for k in dtypes)


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
        opt, ref, ref_opt = _steps_as_unsharded(model, cls, kw, _box_grads, name)
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
