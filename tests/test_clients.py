"""dist8 under clients nobody on the project wrote: accelerate + FSDP2, torch DCP's stateful API,
ZeroRedundancyOptimizer and fairscale OSS (HF Trainer: ``tests/test_hf_trainer.py``).

* ``test_accelerate_sees_grad_scaler_skips_as_with_torch_adamw``: accelerate's
  ``step_was_skipped`` under a GradScaler reports what it reports for torch's fused AdamW, and with
  ``amp_unscale="scaler"`` what it reports for torch's non-fused AdamW (the skip).
* ``test_accelerate_ddp_with_sharded_optimizer_resumes_bitwise``: 2 DDP ranks, ``ShardedOptimizer``
  stage 1 (the stage for a DDP model) with ``full_state_dict=True``: accelerate's
  ``save_state``/``load_state`` resume bitwise.
* ``test_accelerate_fsdp2_optimizer_built_before_sharding``: 2 gloo ranks. The optimizer
  is built on the plain model and ``accelerator.prepare`` applies FSDP2 afterwards,
  swapping DTensors into ``param_groups`` (accelerate's FSDP2 path; accelerate only takes
  it on accelerators, so the test selects it on CPU as a GPU machine would). Training
  matches the unsharded optimizer bitwise; ``save_state``/``load_state`` resume exactly.
* ``test_zero_redundancy_optimizer_...`` / ``test_fairscale_oss_...``: 2 gloo ranks, bitwise equal to the
  plain optimizer; the consolidated state dict loads into a plain dist8 optimizer.
* ``test_peft_lora_adapters_resume_and_release_bitwise``: PEFT's LoRA on a tiny GPT-2 (base frozen,
  adapters trained): a ``dist8.checkpoint`` resume and gradient release (with and without
  ``weight_grad_chunk``) are the uninterrupted normal run, bitwise.
* ``test_dcp_stateful_fsdp2_2_to_1``: a ``Stateful`` app state (model + optimizer through
  ``get_state_dict``/``set_state_dict``, nested or flattened as torchtitan saves it) saved by
  ``torch.distributed.checkpoint`` on 2 FSDP2 ranks and loaded on 1, then stepping as the
  uninterrupted run does.
"""
import os

import pytest
import torch
from torch import nn

import dist8
from dist_utils import run_ranks

os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---- accelerate's AcceleratedOptimizer with a GradScaler ---------------------------------------------
def test_accelerate_sees_grad_scaler_skips_as_with_torch_adamw():
    """accelerate reports ``step_was_skipped`` (HF Trainer then holds the LR scheduler) by noticing that
    ``GradScaler.step`` did not call ``optimizer.step``. Optimizers that take the scaler's check
    themselves (``_step_supports_amp_scaling``: torch's fused AdamW, dist8's default) are always called, so
    accelerate reports no skip for either; dist8 counts its skipped steps in ``amp_skips``. With
    ``amp_unscale="scaler"`` dist8 is stepped like torch's non-fused AdamW, and accelerate sees the skip."""
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    Accelerator(cpu=True)  # AcceleratedOptimizer reads the accelerator's state
    try:
        reports = _scaler_skip_reports(AcceleratedOptimizer)
    finally:
        AcceleratorState._reset_state()
    assert reports["dist8"] == reports["torch fused"] == [(False, True), (False, False), (False, True)]
    assert reports["dist8 scaler"] == reports["torch"] == [(False, True), (True, False), (False, True)]


def test_accelerate_prepared_optimizer_takes_gradient_release():
    """``dist8.gradient_release(model, opt)`` with the optimizer ``accelerator.prepare`` returned (an
    AcceleratedOptimizer) was refused ("needs a dist8 optimizer"); the release now goes on the wrapped
    optimizer, and the loop accelerate's users write (``accelerator.backward``, ``opt.step()``,
    ``opt.zero_grad()``) is bitwise the normal step."""
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def run(release):
        accelerator = Accelerator(cpu=True)
        try:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
            model, opt = accelerator.prepare(model, dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0))
            handle = dist8.gradient_release(model, opt) if release else None
            gen = torch.Generator().manual_seed(1)
            for _ in range(3):
                accelerator.backward(model(torch.randn(8, 64, generator=gen)).square().mean())
                opt.step()
                opt.zero_grad()
            if handle is not None:
                assert handle.steps == 3 * 4 and opt.optimizer.state[model[0].weight]["step"] == 3
            return [p.detach().clone() for p in model.parameters()]
        finally:
            AcceleratorState._reset_state()

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def _scaler_skip_reports(AcceleratedOptimizer):
    """(step_was_skipped, parameters moved) for three steps, the second with a NaN gradient."""
    reports = {}
    for name, make in (("torch fused", lambda p: torch.optim.AdamW(p, lr=0.1, fused=True)),
                       ("dist8", lambda p: dist8.AdamW8bit(p, lr=0.1, min_8bit_size=0)),
                       ("torch", lambda p: torch.optim.AdamW(p, lr=0.1)),
                       ("dist8 scaler", lambda p: dist8.AdamW8bit(p, lr=0.1, min_8bit_size=0, amp_unscale="scaler"))):
        torch.manual_seed(0)
        model = nn.Linear(5, 5)
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        wrapped = AcceleratedOptimizer(opt, device_placement=False, scaler=scaler)
        reports[name] = []
        for overflow in (False, True, False):
            scaler.scale(model(torch.randn(2, 5)).sum()).backward()
            if overflow:
                model.bias.grad[0] = float("nan")
            before = [p.detach().clone() for p in model.parameters()]
            wrapped.step()
            wrapped.zero_grad()
            moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
            reports[name].append((wrapped.step_was_skipped, moved))
        if name.startswith("dist8"):
            assert opt.amp_skips == (1 if name == "dist8" else 0)
    return reports


# ---- accelerate, FSDP2 applied after the optimizer was built -----------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(64, 32)
        self.block = nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32))
        self.head = nn.Linear(32, 64, bias=False)

    def forward(self, x):
        h = self.emb(x)
        return self.head(h + self.block(h))


def _batch(step, n=8, seq=6):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 64, (n, seq), generator=gen)
    return x, (5 * x + 3) % 64


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x).reshape(-1, 64).float(), y.reshape(-1))


def _accelerator_fsdp2():
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            state_dict_type="SHARDED_STATE_DICT")
    acc = Accelerator(fsdp_plugin=plugin, cpu=True)
    if acc.distributed_type != DistributedType.FSDP:
        # accelerate takes its FSDP path only on accelerators (MULTI_GPU, ...); on CPU ranks it
        # falls back to MULTI_CPU and ignores the plugin. Select it as accelerate does on a GPU
        # machine (AcceleratorState.__init__ writes FSDP into PartialState's shared state too).
        acc.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        acc.state.fsdp_plugin = plugin
    assert acc.is_fsdp2
    return acc


def _accelerate_worker(rank, world_size, out_dir):
    from torch.distributed.tensor import DTensor

    acc = _accelerator_fsdp2()
    model = _Net()
    ref_params = {n: nn.Parameter(p.detach().clone()) for n, p in model.named_parameters()}
    kw = dict(lr=3e-3, weight_decay=0.1, min_8bit_size=1000)
    opt = dist8.AdamW8bit(model.parameters(), **kw)  # built on the plain model, before FSDP2
    ref = dist8.AdamW8bit(list(ref_params.items()), **kw)
    model, opt = acc.prepare(model, opt)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]

    def train(steps, start):
        for step in range(start, start + steps):
            x, y = _batch(step)
            per = x.shape[0] // world_size
            loss = _loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
            acc.backward(loss)
            for n, p in zip(names, model.parameters()):
                ref_params[n].grad = p.grad.full_tensor()
            opt.step()
            ref.step()
            opt.zero_grad()
            ref.zero_grad()
            for n, p in zip(names, model.parameters()):
                assert torch.equal(p.full_tensor(), ref_params[n].detach()), f"step {step}: {n} differs"

    train(4, 0)
    acc.save_state(out_dir)
    after_save = {n: p.full_tensor().clone() for n, p in zip(names, model.parameters())}
    train(2, 4)
    uninterrupted = {n: p.full_tensor().clone() for n, p in zip(names, model.parameters())}
    acc.load_state(out_dir)
    for n, p in zip(names, model.parameters()):
        assert torch.equal(p.full_tensor(), after_save[n]), f"{n} not restored by load_state"
    # the same 2 steps again from the loaded state end where the uninterrupted run did
    for step in range(4, 6):
        x, y = _batch(step)
        per = x.shape[0] // world_size
        acc.backward(_loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
        opt.step()
        opt.zero_grad()
    for n, p in zip(names, model.parameters()):
        assert torch.equal(p.full_tensor(), uninterrupted[n]), f"{n}: resumed run differs"
    kinds = {n: str(opt.optimizer.state[p]["state1"].dtype) for n, p in zip(names, model.parameters())}
    return kinds


def test_accelerate_fsdp2_optimizer_built_before_sharding(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    kinds = run_ranks(_accelerate_worker, 2, str(tmp_path / "acc-state"), tmp_path=tmp_path)
    assert kinds[0] == kinds[1]
    assert kinds[0]["emb.weight"] == "torch.uint8" and kinds[0]["block.0.weight"] == "torch.float32"


def _accelerate_release_worker(rank, world_size):
    """accelerate's FSDP2 prepare swaps DTensors into the optimizer's param_groups; gradient_release installed
    after it stepped before following the swap (local-shard state, refused at the first backward with
    "mixed torch.Tensor and DTensor" and a misleading "edited after its last step"; outside probe)."""
    acc = _accelerator_fsdp2()
    out = {}
    for release in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 4))
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)  # before prepare, as accelerate allows
        model, opt = acc.prepare(model, opt)
        handle = dist8.gradient_release(model, opt) if release else None
        for step in range(3):
            g = torch.Generator().manual_seed(10 * step + rank)
            acc.backward(model(torch.randn(4, 32, generator=g)).square().mean())
            opt.step()
            opt.zero_grad()
        out[release] = [p.full_tensor() for p in model.parameters()]
        if handle is not None:
            handle.remove()
    return all(torch.equal(a, b) for a, b in zip(out[False], out[True]))


def test_accelerate_fsdp2_with_gradient_release_is_the_normal_step(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    assert run_ranks(_accelerate_release_worker, 2, tmp_path=tmp_path) == [True, True]


def _accelerate_sharded_worker(rank, world_size):
    """A ShardedOptimizer built before accelerate's FSDP2 prepare was refused as "parameter emb.weight was removed
    from param group 0", advising to freeze it or rebuild (outside probe)."""
    acc = _accelerator_fsdp2()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 4))
    opt = dist8.ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, lr=1e-2)
    model, opt = acc.prepare(model, opt)
    acc.backward(model(torch.randn(4, 32)).square().mean())
    try:
        opt.step()
    except TypeError as exc:
        return str(exc)
    return None


def test_a_sharded_optimizer_under_accelerates_fsdp2_says_to_use_the_optimizer_directly(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    for message in run_ranks(_accelerate_sharded_worker, 2, tmp_path=tmp_path):
        assert message == ("param group 0 now holds FSDP2's DTensor parameters in place of 0.weight: the model was "
                           "sharded with FSDP2 after this ShardedOptimizer was built; use the dist8 optimizer directly "
                           "with FSDP2 instead of ShardedOptimizer (nothing was updated)"), message


def _accelerate_cast_llama_worker(rank, world_size):
    """accelerate's FSDP2 calls torch's fully_shard, one group for the model here: a cast_model'd Llama
    keeps its RMSNorms fp32 next to bf16 weights, which torch refuses at the first forward (naming no
    module); keep_norm_layers=False casts them too (the README's advice for this path)."""
    import transformers

    acc = _accelerator_fsdp2()
    out = {}
    for keep in (True, False):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1))
        dist8.cast_model(model, torch.bfloat16, keep_norm_layers=keep)
        opt = dist8.AdamW8bit(model.parameters(), lr=1e-3, master_weight_bits=24)
        model, opt = acc.prepare(model, opt)
        ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
        try:
            acc.backward(model(input_ids=ids, labels=ids).loss)
            opt.step()
            out[keep] = sorted({str(p.dtype) for p in model.parameters()})
        except AssertionError as e:
            out[keep] = str(e)
    return out


def test_accelerate_fsdp2_takes_a_cast_llama_with_keep_norm_layers_false(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    for out in run_ranks(_accelerate_cast_llama_worker, 2, tmp_path=tmp_path):
        assert "uniform original parameter dtype" in out[True]
        assert out[False] == ["torch.bfloat16"]


# ---- accelerate's DDP with dist8.ShardedOptimizer: save_state / load_state ----------------------------
def _accelerate_ddp_zero(rank, world_size, out_dir, full_state_dict):
    import os

    from accelerate import Accelerator

    from dist8.shard import ShardedOptimizer

    os.environ.update(LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))  # torchrun's, beside run_ranks'
    acc = Accelerator(cpu=True)
    model = _Net()
    opt = ShardedOptimizer(model.parameters(), dist8.AdamW8bit, stage=1, full_state_dict=full_state_dict, lr=3e-3,
                           weight_decay=0.1, min_8bit_size=1000)
    model, opt = acc.prepare(model, opt)

    def train(start, steps):
        for step in range(start, start + steps):
            x, y = _batch(step)
            per = x.shape[0] // world_size
            acc.backward(_loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
            opt.step()
            opt.zero_grad()

    initial = [p.detach().clone() for p in model.parameters()]
    train(0, 3)
    # prepare() copied every parameter (model.to("cpu:0")) after the optimizer was built: until
    # 2026-12-02 the optimizer went on updating its own buffers and the model never trained (both
    # runs below were the initial model, so "resumed_equal" held trivially)
    trained = all(not torch.equal(a, b) for a, b in zip(initial, model.parameters()))
    # every rank calls optimizer.state_dict(); the main process writes it. safetensors' load_model
    # refuses parameters that are views of one storage (ShardedOptimizer's flat buffers): torch files
    acc.save_state(out_dir, safe_serialization=False)
    train(3, 3)
    uninterrupted = [p.detach().clone() for p in model.parameters()]
    acc.load_state(out_dir)  # every rank loads the main process's file
    train(3, 3)
    resumed_equal = all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))
    # a new process's resume: prepare() copies the parameters, load_state() loads the weights into the
    # copies and then the optimizer state (refused as "other values" until the optimizer took them back)
    acc = Accelerator(cpu=True)
    model = _Net()
    opt = ShardedOptimizer(model.parameters(), dist8.AdamW8bit, stage=1, full_state_dict=full_state_dict, lr=3e-3,
                           weight_decay=0.1, min_8bit_size=1000)
    model, opt = acc.prepare(model, opt)
    acc.load_state(out_dir)
    train(3, 3)
    return {"distributed": str(acc.distributed_type), "wrapped": type(model).__name__, "trained": trained,
            "resumed_equal": resumed_equal,
            "fresh_equal": all(torch.equal(a, b) for a, b in zip(uninterrupted, model.parameters()))}


def test_accelerate_ddp_with_sharded_optimizer_resumes_bitwise(tmp_path):
    """accelerate's ``save_state`` calls ``optimizer.state_dict()`` on every rank and writes the main
    process's, and ``load_state`` loads that file on every rank: with ``full_state_dict=True`` it holds
    every rank's blocks (the unsharded format) and 2 DDP ranks of ``ShardedOptimizer`` stage 1 (the stage
    under DDP) resume bitwise. No callback is needed (unlike HF Trainer, which calls ``state_dict()`` on rank 0 alone).
    In the default shard mode the file is rank 0's shard, and rank 1 refuses it naming the option."""
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    out = run_ranks(_accelerate_ddp_zero, 2, str(tmp_path / "acc"), True, tmp_path=tmp_path)
    assert out[0]["distributed"] == "DistributedType.MULTI_CPU" and out[0]["wrapped"] == "DistributedDataParallel"
    assert out[0]["trained"] and out[1]["trained"]
    assert out[0]["resumed_equal"] and out[1]["resumed_equal"]
    assert out[0]["fresh_equal"] and out[1]["fresh_equal"]
    saved = torch.load(tmp_path / "acc" / "optimizer.bin", weights_only=True)
    assert saved["state"][0]["state1"].dtype == torch.uint8  # the embedding's 2048 values: 8-bit
    assert saved["state"][0]["state1"].numel() == 64 * 32, "every rank's blocks are in the main process's file"
    # Without the option, rank 1 is handed rank 0's shard and refuses it, naming the option.
    with pytest.raises(AssertionError, match=r"rank 0 of 2's shard; this is rank 1 of 2.*full_state_dict=True"):
        run_ranks(_accelerate_ddp_zero, 2, str(tmp_path / "acc-shard"), False, tmp_path=tmp_path)


# ---- DCP stateful API, FSDP2 2 -> 1 -----------------------------------------------------------------
class _AppState:
    """torch's recommended ``Stateful`` wrapper: model + optimizer through get/set_state_dict.
    ``flatten``: ``StateDictOptions(flatten_optimizer_state_dict=True)``, torchtitan's setting (one
    flat key per state tensor, ``state.<fqn>.state1``)."""

    def __init__(self, model, optimizer, flatten=False):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        self.model, self.optimizer = model, optimizer
        self.options = StateDictOptions(flatten_optimizer_state_dict=flatten)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self.options)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"], options=self.options)


def _dcp_worker(rank, world_size, path, save, flatten=False):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    model = _Net()
    fully_shard(model, mesh=mesh)
    opt = dist8.AdamW8bit(model.named_parameters(), lr=3e-3, min_8bit_size=1000)

    def train(start, stop):
        for step in range(start, stop):
            x, y = _batch(step)
            per = x.shape[0] // world_size
            _loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
            opt.step()
            opt.zero_grad()

    if save:
        train(0, 3)
        dcp.save({"app": _AppState(model, opt, flatten)}, checkpoint_id=path)
    else:
        dcp.load({"app": _AppState(model, opt, flatten)}, checkpoint_id=path)
    at_checkpoint = (_full_params(model), _full_state(opt))
    train(3, 5)
    return at_checkpoint, _full_params(model)


def _full_params(model):
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _full_state(opt):
    sd = opt.state_dict()  # collective for DTensor parameters: codes as DTensors, absmax whole
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    names = [opt.param_name(p) for g in opt.param_groups for p in g["params"]]
    # clone: on one rank full_tensor() may be the live state itself, which later steps change
    return {name: {k: ((v.full_tensor() if hasattr(v, "full_tensor") else v).clone() if isinstance(v, torch.Tensor) else v)
                   for k, v in sd["state"][i].items()}
            for i, name in zip(ids, names)}


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_dcp_stateful_fsdp2_2_to_1(tmp_path, flatten):
    path = str(tmp_path / "dcp")
    (saved_params, saved_state), saved_final = run_ranks(_dcp_worker, 2, path, True, flatten, tmp_path=tmp_path)[0]
    (loaded_params, loaded_state), loaded_final = run_ranks(_dcp_worker, 1, path, False, flatten, tmp_path=tmp_path)[0]
    assert saved_state.keys() == loaded_state.keys() and saved_state
    for n in saved_params:  # parameters and state (codes, absmax, step) reload exactly at 1 rank
        assert torch.equal(loaded_params[n], saved_params[n]), n
    for n, st in saved_state.items():
        for k, v in st.items():
            assert torch.equal(loaded_state[n][k], v) if isinstance(v, torch.Tensor) else loaded_state[n][k] == v, (n, k)
    # then one rank sees the whole batch where two averaged two halves: the same gradients up to
    # summation order, so the continuations agree closely
    for n in saved_final:
        torch.testing.assert_close(loaded_final[n], saved_final[n], rtol=1e-4, atol=1e-5)


# ---- torch ZeroRedundancyOptimizer and fairscale OSS ------------------------------------------------
def _make_zero(params, **kw):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(params, optimizer_class=dist8.AdamW8bit, **kw)


def _make_oss(params, **kw):
    from fairscale.optim import OSS

    return OSS(params, optim=dist8.AdamW8bit, **kw)


def _state_sharding_worker(rank, world_size, make, to_rank0):
    model, ref_model = _Net(), _Net()
    kw = dict(lr=3e-3, weight_decay=0.1, min_8bit_size=1000)
    wrapper = make(model.parameters(), **kw)
    ref = dist8.AdamW8bit(ref_model.parameters(), **kw)
    for step in range(3):
        x, y = _batch(step)  # the same batch on every rank: the gradients DDP would have averaged
        _loss(model, x, y).backward()
        _loss(ref_model, x, y).backward()
        wrapper.step()
        ref.step()
        wrapper.zero_grad()
        ref.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), f"{n}: {type(wrapper).__name__} run differs from the plain optimizer"
    wrapper.consolidate_state_dict(**to_rank0)
    return (wrapper.state_dict() if rank == 0 else None), ref.state_dict()


def _check_consolidated_loads(consolidated, ref_sd):
    model = _Net()
    opt = dist8.AdamW8bit(model.parameters(), lr=3e-3, weight_decay=0.1, min_8bit_size=1000)
    opt.load_state_dict(consolidated)  # the consolidated dict is a plain per-parameter state dict
    assert consolidated["state"].keys() == ref_sd["state"].keys()
    for i, st in ref_sd["state"].items():
        for k, v in st.items():
            got = opt.state_dict()["state"][i][k]
            assert torch.equal(got, v) if isinstance(v, torch.Tensor) else got == v, (i, k)


def test_zero_redundancy_optimizer_bitwise_and_consolidated_state_loads(tmp_path):
    (consolidated, ref_sd), _ = run_ranks(_state_sharding_worker, 2, _make_zero, {"to": 0}, tmp_path=tmp_path)
    _check_consolidated_loads(consolidated, ref_sd)


def test_fairscale_oss_bitwise_and_consolidated_state_loads(tmp_path):
    pytest.importorskip("fairscale", reason="fairscale is in the [test] extras")
    (consolidated, ref_sd), _ = run_ranks(_state_sharding_worker, 2, _make_oss, {"recipient_rank": 0}, tmp_path=tmp_path)
    _check_consolidated_loads(consolidated, ref_sd)


# ---- state made on plain parameters, then FSDP2 applied -------------------------------------------
def _late_shard_worker(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, ref_model = _Net(), _Net()
    kw = dict(lr=3e-3, weight_decay=0.1, min_8bit_size=1000)
    opt = dist8.AdamW8bit(model.named_parameters(), overrides={"head.*": {"optim_bits": 32}}, **kw)
    ref = dist8.AdamW8bit(ref_model.named_parameters(), overrides={"head.*": {"optim_bits": 32}}, **kw)
    for step in range(2):  # plain (unsharded) steps first: state made for plain tensors
        x, y = _batch(step)
        for m, o in ((model, opt), (ref_model, ref)):
            _loss(m, x, y).backward()
            o.step()
            o.zero_grad()
    old = dict(model.named_parameters())
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    new = dict(model.named_parameters())
    by_old = {id(old[n]): new[n] for n in new}
    for group in opt.param_groups:  # what accelerate's prepare does
        group["params"] = [by_old[id(p)] for p in group["params"]]
    names = list(new)
    for step in range(2, 4):
        x, y = _batch(step)
        per = x.shape[0] // world_size
        _loss(model, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
        for n, p in zip(names, model.parameters()):
            dict(ref_model.named_parameters())[n].grad = p.grad.full_tensor()
        opt.step()
        ref.step()
        opt.zero_grad()
        ref.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p.full_tensor(), q.detach()), f"{n} differs after the switch to FSDP2"
    state = {opt.param_name(p): opt.state[p] for p in model.parameters()}
    assert state["head.weight"]["state1"].dtype == torch.float32  # the name override survived the swap
    assert state["emb.weight"]["state1"].shape == model.emb.weight.to_local().shape  # re-laid-out locally
    return {n: st["step"] for n, st in state.items()}


def test_state_made_before_fsdp2_is_relaid_out_exactly(tmp_path):
    steps = run_ranks(_late_shard_worker, 2, tmp_path=tmp_path)
    assert set(steps[0].values()) == {4} and steps[0] == steps[1]


def test_peft_lora_adapters_resume_and_release_bitwise(tmp_path):
    """LoRA fine-tuning (PEFT), the most common use of bitsandbytes' 8-bit optimizers: only the adapters
    are trainable (lora_B starts at zero, so lora_A's first gradients are exactly zero). A run saved by
    ``dist8.checkpoint`` at step 3 and resumed into a model built from another seed ends bitwise equal to
    the uninterrupted run, and ``gradient_release`` (whole gradients, and ``weight_grad_chunk`` over the
    adapters' Linear layers, the frozen base layers left unchunked with the reason) is that run too."""
    pytest.importorskip("peft", reason="peft is in the [test] extras")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    def lora_gpt2(seed):
        torch.manual_seed(seed)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                                lora_dropout=0.0))
        return model, dist8.AdamW8bit([(n, p) for n, p in model.named_parameters() if p.requires_grad],
                                      lr=1e-3, min_8bit_size=0)

    x = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))

    def train(model, opt, steps):
        for _ in range(steps):
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()

    def weights(model):
        return [p.detach().clone() for p in model.parameters()]

    model, opt = lora_gpt2(0)
    assert len(opt.param_groups[0]["params"]) == 12  # lora_A/B of attn.c_attn, attn.c_proj, mlp.c_proj x 2 layers
    train(model, opt, 3)
    dist8.checkpoint.save(tmp_path / "ck", model, opt, step=3)
    train(model, opt, 3)
    resumed, resumed_opt = lora_gpt2(1)
    dist8.checkpoint.load(tmp_path / "ck", resumed, resumed_opt)
    train(resumed, resumed_opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(resumed))), "resumed LoRA run differs"
    for chunk in (None, 256):
        released, released_opt = lora_gpt2(0)
        handle = dist8.gradient_release(released, released_opt, weight_grad_chunk=chunk)
        if chunk:
            assert all("lora_" in name for name in handle.chunks.chunked)
            assert handle.chunks.unchunked["base_model.model.transformer.wte"] == "its weight is frozen or not in the optimizer"
        train(released, released_opt, 6)
        handle.remove()
        assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(released))), f"release ({chunk=}) differs"
