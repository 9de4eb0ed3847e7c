"""dist8 on a real GPU the way users run it: whole optimizers, checkpoints, gradient release, FSDP2,
ShardedOptimizer and HF Trainer with CUDA tensors, each held bitwise to a CPU run or to the plain step.

The kernel tests (``tests/test_kernels*.py``, ``cuda-*`` cases) hold each CUDA kernel to the
reference; these hold everything around them, where a tensor made on the wrong device, a host copy
or a device-dependent branch would show only on a GPU. CI has no GPU: every test here is skipped
there, saying why, and ``bench/gpu_check.sh`` runs this file on a lent GPU machine (its ``flows`` part).

Gradients are set explicitly (``fsdp_utils.synthetic_grad``) wherever a CPU run is compared, since
a GPU's matmuls round differently; the models compared on one GPU (gradient release) have only
Linear and LayerNorm layers, whose backward on a GPU is deterministic.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist8
from fsdp_utils import assert_same_params, assert_same_state, full_params, full_state, synthetic_grad

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)")]

KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)
# (parameter dtype, master_weight_bits): fp32 params, and bf16 params with 24-bit, 32-bit and no masters
DTYPES = [(torch.float32, None), (torch.bfloat16, 24), (torch.bfloat16, 32), (torch.bfloat16, None)]
DTYPE_IDS = ["fp32", "bf16-master24", "bf16-master32", "bf16-pure"]


class MLP(nn.Module):
    def __init__(self, d: int = 96, hidden: int = 320, out: int = 40) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.fc2 = nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(x))))


def make_mlp(device, dtype=torch.float32) -> MLP:
    torch.manual_seed(0)
    model = MLP().to(device)
    if dtype != torch.float32:
        dist8.cast_model(model, dtype)  # the LayerNorm stays fp32
    return model


def make_opt(model: nn.Module, master_bits, cls=dist8.AdamW8bit, **extra):
    kw = dict(KW, **extra)
    if master_bits is not None:
        kw["master_weight_bits"] = master_bits
    return cls(model.named_parameters(), **kw)


def set_synthetic_grads(model: nn.Module, step: int) -> None:
    """The same gradients on any device: drawn on the CPU, moved; one inf at step 2 (its block is skipped)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        g = synthetic_grad(name, tuple(p.shape), step)
        if step == 2 and name == "fc1.weight":
            g[3, 5] = float("inf")
        if isinstance(p, DTensor):
            p.grad = distribute_tensor(g.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        else:
            p.grad = g.to(p.device, p.dtype)


def run(model: nn.Module, opt, start: int, stop: int) -> None:
    for step in range(start, stop):
        set_synthetic_grads(model, step)
        opt.step()
        opt.zero_grad()


def cpu_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in full_params(model).items()}


def cpu_state(opt) -> dict:
    return {name: {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
            for name, st in full_state(opt).items()}


def assert_same_run(model_a, opt_a, model_b, opt_b, where: str, skips: bool = True) -> None:
    """Parameters and state bitwise; ``skips``: the skip counters too (they count this process's steps:
    a loaded optimizer starts from 0)."""
    assert_same_params(cpu_params(model_a), cpu_params(model_b), where)
    assert_same_state(cpu_state(opt_a), cpu_state(opt_b), where)
    if skips:
        assert opt_a.nonfinite_skips == opt_b.nonfinite_skips, f"{where}: skip counts differ"


def assert_on_gpu(opt) -> None:
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.numel() > 1:
                assert v.device.type == "cuda", f"state {k} of a {tuple(p.shape)} parameter is on {v.device}"


# ---- one device against the other --------------------------------------------------------------
@pytest.mark.parametrize("dtype,master_bits", DTYPES, ids=DTYPE_IDS)
def test_gpu_steps_equal_cpu_steps(dtype, master_bits):
    gpu, cpu = make_mlp("cuda", dtype), make_mlp("cpu", dtype)
    gpu_opt, cpu_opt = make_opt(gpu, master_bits), make_opt(cpu, master_bits)
    run(gpu, gpu_opt, 0, 5)
    run(cpu, cpu_opt, 0, 5)
    assert gpu_opt.nonfinite_skips == 1
    assert_on_gpu(gpu_opt)
    assert_same_run(gpu, gpu_opt, cpu, cpu_opt, "GPU vs CPU")


@pytest.mark.parametrize("dtype,master_bits", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_checkpoint_saved_on_gpu_loads_on_cpu_and_gpu(tmp_path, dtype, master_bits):
    gpu = make_mlp("cuda", dtype)
    gpu_opt = make_opt(gpu, master_bits)
    run(gpu, gpu_opt, 0, 3)
    dist8.checkpoint.save(tmp_path / "ck", gpu, gpu_opt, step=3)
    loaded = {}
    for device in ("cpu", "cuda"):
        other = make_mlp(device, dtype)
        other_opt = make_opt(other, master_bits)
        dist8.checkpoint.load(tmp_path / "ck", other, other_opt)
        run(other, other_opt, 3, 6)
        loaded[device] = (other, other_opt)
    assert_on_gpu(loaded["cuda"][1])
    run(gpu, gpu_opt, 3, 6)
    assert_same_run(gpu, gpu_opt, *loaded["cpu"], "saved on GPU, loaded on CPU", skips=False)
    assert_same_run(gpu, gpu_opt, *loaded["cuda"], "saved on GPU, loaded on GPU", skips=False)
    # and back: a CPU checkpoint loads on the GPU
    dist8.checkpoint.save(tmp_path / "ck-cpu", *loaded["cpu"], step=6)
    again = make_mlp("cuda", dtype)
    again_opt = make_opt(again, master_bits)
    dist8.checkpoint.load(tmp_path / "ck-cpu", again, again_opt)
    run(again, again_opt, 6, 8)
    run(gpu, gpu_opt, 6, 8)
    assert_same_run(gpu, gpu_opt, again, again_opt, "saved on CPU, loaded on GPU", skips=False)


def test_state_dict_moves_between_devices():
    """torch's contract: load_state_dict puts the state on each parameter's device."""
    gpu, cpu = make_mlp("cuda"), make_mlp("cpu")
    gpu_opt, cpu_opt = make_opt(gpu, None), make_opt(cpu, None)
    run(gpu, gpu_opt, 0, 3)
    cpu.load_state_dict(gpu.state_dict())
    cpu_opt.load_state_dict(gpu_opt.state_dict())
    run(cpu, cpu_opt, 3, 5)
    run(gpu, gpu_opt, 3, 5)
    assert_same_run(gpu, gpu_opt, cpu, cpu_opt, "GPU state_dict loaded on CPU", skips=False)
    back = make_mlp("cuda")
    back_opt = make_opt(back, None)
    back.load_state_dict(cpu.state_dict())
    back_opt.load_state_dict(cpu_opt.state_dict())
    assert_on_gpu(back_opt)
    run(back, back_opt, 5, 7)
    run(gpu, gpu_opt, 5, 7)
    assert_same_run(gpu, gpu_opt, back, back_opt, "CPU state_dict loaded on GPU", skips=False)


def test_tensor_lr_on_the_gpu_with_a_scheduler():
    """A tensor lr (torch's capturable/compiled idiom) on the parameters' GPU, driven by a scheduler."""
    runs = []
    for device in ("cuda", "cpu"):
        model = make_mlp(device)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=torch.tensor(1e-2, device=device), min_8bit_size=0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        for step in range(4):
            set_synthetic_grads(model, step)
            opt.step()
            sched.step()
        runs.append((model, opt))
    assert_same_run(*runs[0], *runs[1], "tensor lr GPU vs CPU")


@pytest.mark.parametrize("mode", ["skip_param", "raise"])
def test_nonfinite_modes_on_gpu(mode):
    gpu, cpu = make_mlp("cuda"), make_mlp("cpu")
    gpu_opt, cpu_opt = make_opt(gpu, None, on_nonfinite=mode), make_opt(cpu, None, on_nonfinite=mode)
    if mode == "raise":
        run(gpu, gpu_opt, 0, 2)
        before = cpu_params(gpu)
        set_synthetic_grads(gpu, 2)
        with pytest.raises(Exception, match="fc1.weight|non-finite|inf"):
            gpu_opt.step()
        assert_same_params(before, cpu_params(gpu), "raise changed a parameter")
        return
    run(gpu, gpu_opt, 0, 5)
    run(cpu, cpu_opt, 0, 5)
    assert gpu_opt.nonfinite_skips == 1
    assert_same_run(gpu, gpu_opt, cpu, cpu_opt, f"{mode} GPU vs CPU")


def test_every_optimizer_family_steps_on_gpu_as_on_cpu():
    """The families beyond the kernel tests' five, each 8-bit and 32-bit, and StableEmbedding's 32-bit override."""
    for name in ("Adam", "SGD", "RMSprop", "Adagrad", "Lion", "AdEMAMix", "LAMB", "LARS"):
        for bits in ("8bit", "32bit"):
            cls = getattr(dist8, name + bits)
            extra = {"momentum": 0.9} if name in ("SGD", "LARS") else {}
            runs = []
            for device in ("cuda", "cpu"):
                torch.manual_seed(0)
                model = nn.Sequential(dist8.nn.StableEmbedding(300, 48), nn.Linear(48, 300)).to(device)
                opt = cls(model.named_parameters(), lr=1e-3, min_8bit_size=0, **extra)
                for step in range(4):
                    for n, p in model.named_parameters():
                        p.grad = synthetic_grad(n, tuple(p.shape), step).to(device)
                    opt.step()
                runs.append((model, opt))
            if name in ("LAMB", "LARS"):  # the trust ratio's norms sum in another order on the GPU
                for n, p in runs[0][0].named_parameters():
                    q = dict(runs[1][0].named_parameters())[n]
                    torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6, msg=f"{name}{bits} {n}")
                continue
            assert_same_run(*runs[0], *runs[1], f"{name}{bits} GPU vs CPU")


# ---- gradient release --------------------------------------------------------------------------
def _batches(device, dtype, n=4):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(64, 96, generator=gen).to(device, dtype), torch.randint(0, 40, (64,), generator=gen).to(device))
            for _ in range(n)]


def _train(model, opt, batches) -> list[float]:
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("chunk", [None, 4096], ids=["whole", "weight_grad_chunk"])
@pytest.mark.parametrize("dtype,master_bits", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_gradient_release_on_gpu_is_the_step(dtype, master_bits, chunk):
    plain, released = make_mlp("cuda", dtype), make_mlp("cuda", dtype)
    plain_opt, released_opt = make_opt(plain, master_bits), make_opt(released, master_bits)
    batches = _batches("cuda", dtype)
    handle = dist8.gradient_release(released, released_opt, weight_grad_chunk=chunk)
    try:
        assert _train(released, released_opt, batches) == _train(plain, plain_opt, batches)
    finally:
        handle.remove()
    assert all(p.grad is None for p in released.parameters())
    assert_same_run(released, released_opt, plain, plain_opt, f"gradient release ({chunk=}) vs step")


# ---- process groups: NCCL at world size 1 (one GPU) ----------------------------------------------
@pytest.fixture
def nccl_world_of_one():
    if not dist.is_nccl_available():
        pytest.fail("torch was built without NCCL on a machine with a CUDA device")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=torch.device("cuda", 0))
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp2_mlp(dtype=torch.float32):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_mlp("cuda", dtype)
    mesh = init_device_mesh("cuda", (1,))
    for layer in (model.fc1, model.fc2):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@pytest.mark.parametrize("dtype,master_bits", DTYPES[:2], ids=DTYPE_IDS[:2])
def test_fsdp2_on_gpu_steps_and_checkpoints_as_unsharded(nccl_world_of_one, tmp_path, dtype, master_bits):
    from dist8.integrations.fsdp import load_dcp, save_dcp

    sharded, plain = _fsdp2_mlp(dtype), make_mlp("cuda", dtype)
    opt, plain_opt = make_opt(sharded, master_bits), make_opt(plain, master_bits)
    run(sharded, opt, 0, 4)
    run(plain, plain_opt, 0, 4)
    assert_same_run(sharded, opt, plain, plain_opt, "FSDP2 vs unsharded")
    dist8.checkpoint.save(tmp_path / "ck", sharded, opt, step=4)
    save_dcp(str(tmp_path / "dcp"), sharded, opt)
    cpu = make_mlp("cpu", dtype)
    cpu_opt = make_opt(cpu, master_bits)
    dist8.checkpoint.load(tmp_path / "ck", cpu, cpu_opt)
    again = _fsdp2_mlp(dtype)
    again_opt = make_opt(again, master_bits)
    run(again, again_opt, 0, 1)  # DCP loads into existing state
    load_dcp(str(tmp_path / "dcp"), again, again_opt)
    for model, o in ((sharded, opt), (cpu, cpu_opt), (again, again_opt)):
        run(model, o, 4, 6)
    assert_same_run(sharded, opt, cpu, cpu_opt, "FSDP2 on GPU -> dist8 checkpoint -> CPU", skips=False)
    assert_same_run(sharded, opt, again, again_opt, "FSDP2 on GPU -> DCP -> FSDP2 on GPU", skips=False)


def test_fsdp2_gradient_release_on_gpu(nccl_world_of_one):
    plain, released = _fsdp2_mlp(), _fsdp2_mlp()
    plain_opt, released_opt = make_opt(plain, None), make_opt(released, None)
    batches = _batches("cuda", torch.float32)
    handle = dist8.gradient_release(released, released_opt)
    try:
        assert _train(released, released_opt, batches) == _train(plain, plain_opt, batches)
    finally:
        handle.remove()
    assert_same_run(released, released_opt, plain, plain_opt, "FSDP2 gradient release vs step")


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_optimizer_on_gpu(nccl_world_of_one, tmp_path, stage):
    sharded, plain = make_mlp("cuda"), make_mlp("cuda")
    opt = dist8.ShardedOptimizer(sharded.named_parameters(), dist8.AdamW8bit, stage=stage, **KW)
    plain_opt = make_opt(plain, None)
    for step in range(4):
        set_synthetic_grads(sharded, step)
        set_synthetic_grads(plain, step)
        opt.step()
        plain_opt.step()
    assert_same_params(cpu_params(sharded), cpu_params(plain), f"ShardedOptimizer stage {stage} vs plain")
    dist8.checkpoint.save(tmp_path / "ck", sharded, opt, step=4)
    cpu = make_mlp("cpu")
    cpu_opt = make_opt(cpu, None)
    dist8.checkpoint.load(tmp_path / "ck", cpu, cpu_opt)
    run(cpu, cpu_opt, 4, 6)
    run(plain, plain_opt, 4, 6)
    assert_same_run(plain, plain_opt, cpu, cpu_opt, f"stage {stage} on GPU -> checkpoint -> CPU", skips=False)


# ---- clients -----------------------------------------------------------------------------------
@pytest.fixture
def deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("bf16_master", [False, True], ids=["fp32", "bf16-master24"])
def test_hf_trainer_on_gpu_resumes_bitwise(tmp_path, monkeypatch, bf16_master, deterministic_algorithms):
    """HF Trainer on the GPU (no use_cpu), deterministic algorithms on: a run resumed from its step-3
    checkpoint ends bitwise equal to the uninterrupted run."""
    pytest.importorskip("transformers", reason="transformers is in the [test] extras")
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs

    class Tokens(torch.utils.data.Dataset):
        x = torch.randint(0, 128, (48, 16), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"input_ids": self.x[i], "labels": self.x[i]}

    def trainer(out_dir, steps):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        kwargs = {"lr": 3e-3, "min_8bit_size": 1024}
        if bf16_master:
            dist8.cast_model(model, torch.bfloat16)
            kwargs["master_weight_bits"] = 24
        args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=3, report_to=[], seed=0, logging_steps=1,
                                 disable_tqdm=True, lr_scheduler_type="linear", warmup_steps=2)
        return Trainer(model=model, args=args, train_dataset=Tokens(), optimizer_cls_and_kwargs=(dist8.AdamW8bit, kwargs))

    full = trainer(tmp_path / "full", 6)
    full.train()
    assert next(full.model.parameters()).device.type == "cuda"
    assert_on_gpu(full.optimizer.optimizer if hasattr(full.optimizer, "optimizer") else full.optimizer)
    resumed = trainer(tmp_path / "resumed", 6)  # a fresh process would look the same
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), f"{n} differs after resuming on the GPU"


def test_accelerate_fp16_mixed_precision_on_gpu():
    """accelerate's fp16 autocast + GradScaler on the GPU with a dist8 optimizer: the scaler's
    inf check skips the overflowing steps, the others update 8-bit state on the GPU."""
    pytest.importorskip("accelerate", reason="accelerate is in the [test] extras")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A Trainer earlier in this process made accelerate's process-wide state (mixed_precision "no"),
    # which a new Accelerator may not change; accelerate's own tests reset it the same way.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="fp16")
    model = make_mlp("cpu")
    opt = dist8.AdamW8bit(model.parameters(), lr=1e-2, min_8bit_size=0)
    model, opt = accelerator.prepare(model, opt)
    losses = []
    for x, y in _batches(accelerator.device, torch.float32, n=2) * 6:  # two batches, six times: learnable
        with accelerator.autocast():
            loss = nn.functional.cross_entropy(model(x).float(), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    inner = opt.optimizer
    assert_on_gpu(inner)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert inner.state[next(iter(model.parameters()))]["state1"].dtype == torch.uint8
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_lightning_mixed_precision_on_gpu(tmp_path, precision):
    """Lightning on the GPU with a dist8 optimizer from configure_optimizers: bf16 autocast, and fp16
    with Lightning's GradScaler. The 8-bit state lives on the GPU while it trains; Lightning's teardown
    moves it and the model to the CPU after ``fit`` (its ``_optimizers_to_device``), and a second
    ``fit`` moves them back and continues from that state."""
    L = pytest.importorskip("lightning", reason="lightning is in the [test] extras")

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_mlp("cpu")
            self.losses, self.state_devices = [], set()

        def training_step(self, batch, _):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x).float(), y)
            self.losses.append(loss.item())
            return loss

        def on_train_batch_end(self, *_):
            state = self.trainer.optimizers[0].state[self.net.fc1.weight]
            self.state_devices |= {state["state1"].device.type, state["absmax1"].device.type, self.net.fc1.weight.device.type}

        def configure_optimizers(self):
            return dist8.AdamW8bit(self.parameters(), lr=1e-2, min_8bit_size=0)

    x, y = _batches("cpu", torch.float32, n=1)[0]
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    module = Module()

    def fit(steps, ckpt_path=None):
        trainer = L.Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=steps, logger=False,
                            enable_progress_bar=False, default_root_dir=str(tmp_path))
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return trainer

    first = fit(10)
    assert module.state_devices == {"cuda"}, module.state_devices
    opt = first.optimizers[0]
    assert opt.state[module.net.fc1.weight]["state1"].dtype == torch.uint8
    assert module.losses[-1] < module.losses[0], module.losses
    # resumed from Lightning's own checkpoint of the first fit: the state goes back to the GPU
    module.state_devices.clear()
    ckpt = next((tmp_path / "checkpoints").glob("*.ckpt"))
    second = fit(14, ckpt_path=str(ckpt))
    assert module.state_devices == {"cuda"}, module.state_devices
    assert second.optimizers[0].state[module.net.fc1.weight]["step"] == 14
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_compiled_model_and_compiled_step_on_gpu():
    """torch.compile'd model and ``torch.compile(opt.step)`` (PyTorch's recipe) on the GPU: the compiled
    step is the eager step, bitwise."""
    eager, compiled = make_mlp("cuda"), make_mlp("cuda")
    eager_opt, compiled_opt = make_opt(eager, None), make_opt(compiled, None)
    step = torch.compile(compiled_opt.step)
    forward = torch.compile(compiled)
    x = _batches("cuda", torch.float32, n=1)[0][0]
    assert torch.isfinite(forward(x)).all()
    for s in range(4):
        set_synthetic_grads(eager, s)
        set_synthetic_grads(compiled, s)
        eager_opt.step()
        step()
    assert_same_run(compiled, compiled_opt, eager, eager_opt, "torch.compile(opt.step) vs eager")


BNB_NAMES = {"AdamW8bit": 1e-3, "Adam8bit": 1e-3, "Lion8bit": 1e-4}


@pytest.mark.parametrize("name", list(BNB_NAMES))
def test_bitsandbytes_gpu_run_continues_in_dist8_and_back(name):
    """A run of bitsandbytes' own CUDA optimizer continues in dist8 (from_bitsandbytes) and a dist8 run
    in bitsandbytes (to_bitsandbytes), on the GPU: the codes and absmax travel unchanged, and the
    continued runs stay within the 8-bit rounding of each other."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [test] extras")
    from dist8.checkpoint.convert import from_bitsandbytes, to_bitsandbytes

    lr = BNB_NAMES[name]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(64, 300, generator=gen), torch.randn(300, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen).cuda() for t in start] for _ in range(8)]

    def params():
        return [nn.Parameter(t.clone().cuda()) for t in start]

    def steps(opt, first, last):
        for s in range(first, last):
            for p, g in zip(opt.param_groups[0]["params"], grads[s]):
                p.grad = g.clone()
            opt.step()

    theirs = getattr(bnb.optim, name)(params(), lr=lr, min_8bit_size=0)
    steps(theirs, 0, 4)
    mine = getattr(dist8, name)([nn.Parameter(p.detach().clone()) for p in theirs.param_groups[0]["params"]],
                                lr=lr, min_8bit_size=0)
    mine.load_state_dict(from_bitsandbytes(theirs.state_dict(), optimizer=mine))
    assert_on_gpu(mine)
    for p, q in zip(theirs.param_groups[0]["params"], mine.param_groups[0]["params"]):
        for key in ("state1", "absmax1"):
            assert torch.equal(theirs.state[p][key], mine.state[q][key]), f"{name}: {key} changed on the way in"
    back = getattr(bnb.optim, name)([nn.Parameter(p.detach().clone()) for p in mine.param_groups[0]["params"]],
                                    lr=lr, min_8bit_size=0)
    back.load_state_dict(to_bitsandbytes(mine, back))
    steps(theirs, 4, 8)
    steps(mine, 4, 8)
    steps(back, 4, 8)
    for a, b, c, s in zip(theirs.param_groups[0]["params"], mine.param_groups[0]["params"],
                          back.param_groups[0]["params"], start):
        moved = (a.detach().cpu() - s).abs().max()
        assert torch.equal(a, c), f"{name}: bitsandbytes from dist8's converted state is not bitsandbytes' own run"
        assert (a - b).abs().max() <= 0.25 * moved, f"{name}: dist8 continued {(a - b).abs().max():.3g} away ({moved=:.3g})"
