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
* Tensor parallelism and FSDP + TP on 2-D meshes: ``test_tensor_parallel.py``.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist8
from dist_utils import run_ranks
from fsdp_utils import (MORE, SAVE_AT, assert_same_params, assert_same_state, batch, dcp_model,
                        full_params, full_state, loss_fn, make_model, mesh_of, reference_copy, reference_run, run_steps,
                        set_grads, steps_as_unsharded)

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
    "AdamW32bit": (dist8.AdamW32bit, dict(lr=1e-2, weight_decay=0.1)),  # fp32 states at the edges and in boxes
    "SGD8bit": (dist8.SGD8bit, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=1e-3, weight_decay=0.1, maximize=True)),  # the sign on DTensor shards
    "RMSprop8bit": (dist8.RMSprop8bit, dict(lr=1e-3, alpha=0.9, block_wise=False)),
    "Adagrad8bit": (dist8.Adagrad8bit, dict(lr=1e-2)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, weight_decay=0.01, percentile_clipping=95, maximize=True)),
    "LARS8bit": (dist8.LARS8bit, dict(lr=1e-1, momentum=0.9, weight_decay=1e-4)),
    "AdEMAMix8bit": (dist8.AdEMAMix8bit, dict(lr=1e-2, t_alpha=3, t_beta3=3)),  # three states at the edges
}


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
        opt, ref, ref_opt = steps_as_unsharded(model, cls, kw, set_grads, name)
        assert ref_opt.nonfinite_skips == 2, name  # c's block and b's
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
    # Meta-device init: to_empty swaps every DTensor parameter (torch.utils.swap_tensors), which takes the
    # parameter's attributes with it; the embedding puts its mark back (it was silently 8-bit).
    # The optimizer may also be built before to_empty (torch's are): it holds no weak reference to a
    # parameter, which swap_tensors refuses ("Couldn't swap FSDPLinear.weight").
    for how in ("dist8.fully_shard", "prepare", "meta init + to_empty", "meta init + to_empty after the optimizer"):
        with torch.device("meta" if how.startswith("meta") else "cpu"):
            model = make_model(stable=True, vocab=200)
        if how == "prepare":
            fully_shard(model, mesh=mesh)
            d8fsdp.prepare(model)
        else:
            d8fsdp.fully_shard(model, mesh=mesh)
        if how.endswith("after the optimizer"):
            opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-3, min_8bit_size=1000)
        if how.startswith("meta"):
            model.to_empty(device="cpu")
            torch.manual_seed(0)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
            with torch.no_grad():
                model.pos.zero_()
        if not how.endswith("after the optimizer"):
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
        big = "torch.float32" if name == "AdamW32bit" else "torch.uint8"
        assert res[name] == {"a.weight": big, "a.bias": "torch.float32", "b.weight": big,
                             "b.bias": "torch.float32", "c": big, "d": big, "e": big}, name
    for how in ("dist8.fully_shard", "prepare", "meta init + to_empty", "meta init + to_empty after the optimizer"):
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


# ---- torch.compile(opt.step) ----------------------------------------------------------------------
def _compiled_step_worker(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    out = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 300), nn.GELU(), nn.Linear(300, 40))
        fully_shard(model, mesh=mesh_of(world_size))
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, percentile_clipping=50, min_8bit_size=0)
        step = torch.compile(opt.step) if compiled else opt.step
        for s in range(3):
            model(torch.randn(8, 32, generator=torch.Generator().manual_seed(10 * s + rank))).square().mean().backward()
            step()
            opt.zero_grad()
        out.append(full_params(model))
    return out


def test_compiled_step_on_fsdp2_parameters_is_the_eager_step(tmp_path):
    """torch.compile(opt.step) over DTensor parameters traced the state layout code into an inductor
    graph that failed at the first step (NameError in the generated code); the step now runs eagerly
    inside a compiled function (one graph break), bitwise the eager run."""
    eager, compiled = run_ranks(_compiled_step_worker, 2, tmp_path=tmp_path)[0]
    assert_same_params(compiled, eager, "compiled step")
