"""Shared helpers of the FSDP2 tests (models, synthetic gradients, full-state comparison, the DCP case)."""
import zlib

import torch
import torch.distributed as dist
from torch import nn

import dist8
from dist8.nn import StableEmbedding

__all__ = [
    "TinyGPT", "make_model", "batch", "loss_fn", "mesh_of", "full_state", "full_params", "assert_same_state",
    "assert_same_params", "reference_copy", "synthetic_grad", "set_grads", "DcpModel", "DCP_KW", "SAVE_AT", "MORE",
    "dcp_model", "reference_run", "run_steps", "steps_as_unsharded",
]


class TinyGPT(nn.Module):
    """Token + position embeddings, one pre-norm MLP block, a LayerNorm and an output head."""

    def __init__(self, vocab=50, d=40, hidden=100, seq=8, stable=False):
        super().__init__()
        self.tok = StableEmbedding(vocab, d) if stable else nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.ln1 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        x = x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln1(x))))
        return self.head(self.ln_f(x))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return TinyGPT(**kw)


def batch(step, n=8, seq=8, vocab=50):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, vocab, (n, seq), generator=gen)
    return x, (3 * x + 1) % vocab  # a learnable map, so the loss goes down


def loss_fn(model, x, y):
    logits = model(x)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def mesh_of(world_size):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world_size,))


def full_state(opt):
    """Per parameter name: full codes / fp32 state (DTensors gathered) and full absmax."""
    sd = opt.state_dict()
    out = {}
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    for pid, p in zip(ids, params):
        st = sd["state"].get(pid)
        if not st:
            continue
        out[opt.param_name(p)] = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone()
                                  if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    return out


def full_params(model):
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for n, p in model.named_parameters()}


def assert_same_state(a, b, where):
    assert a.keys() == b.keys(), where
    for name in a:
        assert a[name].keys() == b[name].keys(), (where, name)
        for k, v in a[name].items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == b[name][k].dtype and torch.equal(v, b[name][k]), f"{where}: {name}.{k} differs"
            else:
                assert v == b[name][k], (where, name, k)


def assert_same_params(a, b, where):
    for name in a:
        diff = (a[name].float() - b[name].float()).abs().max()
        assert torch.equal(a[name], b[name]), f"{where}: parameter {name} differs (max {diff})"


def reference_copy(model):
    """Plain (unsharded) parameters with the same values and names."""
    return {n: nn.Parameter(p.clone()) for n, p in full_params(model).items()}


def synthetic_grad(name, shape, step):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    return torch.randn(shape, generator=gen)


def set_grads(model, ref, step):
    from torch.distributed.tensor import distribute_tensor

    for n, p in model.named_parameters():
        g = synthetic_grad(n, tuple(p.shape), step)
        if step == 1 and n == "c":
            g[7] = float("nan")  # non-finite on one rank only: every rank must skip the step of c
        if step == 1 and n == "b.weight":  # Wide's Shard(1) box (the specification path): a block across ranks
            g[40, 20] = float("inf")  # skipped on every rank holding part of it, its absmax kept for the next steps
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
        if ref is not None:
            ref[n].grad = g.clone()


class DcpModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.l1 = nn.Linear(100, 128)  # weight (128, 100): rows 43/43/42 on 3 ranks; row length 100
        self.l2 = nn.Linear(128, 33)  # weight (33, 128): 17/16 on 2 ranks; bias (33,): one block, all ranks
        # 3 rows: 1/1/1/0 on 4 ranks, an empty shard starting mid-block (2100 % 256); 2/1 on 2 ranks
        self.e = nn.Parameter(torch.randn(3, 700))

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


DCP_KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0, percentile_clipping=90)
SAVE_AT = 3
MORE = 5


def dcp_model(world_size):
    """A DcpModel under fully_shard on ``world_size`` ranks and its AdamW8bit."""
    from torch.distributed.fsdp import fully_shard

    model = DcpModel()
    fully_shard(model, mesh=mesh_of(world_size))
    return model, dist8.AdamW8bit(model.named_parameters(), **DCP_KW)


def reference_run(steps):
    """Unsharded AdamW8bit after ``steps`` synthetic-gradient steps: (params, state)."""
    model = DcpModel()
    ref = reference_copy(model)
    opt = dist8.AdamW8bit(list(ref.items()), **DCP_KW)
    snapshots = {}
    for step in range(steps):
        for n, p in ref.items():
            p.grad = synthetic_grad(n, tuple(p.shape), step)
        opt.step()
        snapshots[step + 1] = ({n: p.detach().clone() for n, p in ref.items()}, full_state(opt))
    return snapshots


def run_steps(model, opt, start, stop):
    """Synthetic-gradient steps ``start..stop-1`` of an FSDP2 model."""
    for step in range(start, stop):
        set_grads(model, None, step)
        opt.step()
        opt.zero_grad()


def steps_as_unsharded(model, cls, kw, set_grads_fn, name, steps=4):
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
