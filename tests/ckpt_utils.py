"""The small model, optimizer arguments and training helpers shared by the checkpoint tests."""
import torch

import dist8
import dist8.checkpoint as ck
from dist8.shard import ShardedOptimizer

SHAPES = {"emb": (50, 40), "w1": (33, 100), "b1": (33,), "w2": (300, 7), "tiny": (3,)}
KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)


def make_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for name, shape in SHAPES.items():
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
    return model


def grads_for(step):
    """Identical on every rank and dyadic, so averaging over any world size gives exactly these."""
    gen = torch.Generator().manual_seed(1000 + step)
    return {n: torch.randint(-256, 256, s, generator=gen).float() / 512 for n, s in SHAPES.items()}


def train(model, opt, steps, first):
    """``steps`` optimizer steps on the gradients of steps ``first``, ``first + 1``, ..."""
    for step in range(first, first + steps):
        opt.zero_grad()
        g = grads_for(step)
        sum((p * g[n]).sum() for n, p in model.named_parameters()).backward()
        opt.step()


def snapshot(model, opt):
    """Parameters and the whole optimizer state (consolidated when sharded), for exact comparisons."""
    state = opt.consolidated_state_dict() if isinstance(opt, ShardedOptimizer) else opt.state_dict()
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()}, "state": state}


def assert_same(a, b):
    """Two snapshots are bit for bit equal, and hold a trained optimizer (two untrained ones would be too)."""
    assert a["state"]["state"] and all(st.get("step", 0) > 0 for st in a["state"]["state"].values()), \
        "no optimizer state: nothing was trained"
    for n in a["params"]:
        assert torch.equal(a["params"][n], b["params"][n]), n
    for i, st in a["state"]["state"].items():
        for k, v in st.items():
            other = b["state"]["state"][i][k]
            assert (torch.equal(v, other) if torch.is_tensor(v) else v == other), (i, k)


# Rank workers (tests/dist_utils.run_ranks): a ShardedOptimizer(AdamW8bit, **KW, **kw) run saved after
# ``steps``, resumed for ``steps`` more from a different init, and the same run uninterrupted.
def save_sharded(rank, world_size, path, steps, kw):
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW, **kw)
    train(model, opt, steps, 0)
    ck.save(path, model, opt, step=steps, extra={"data_position": steps})


def resume_sharded(rank, world_size, path, steps, kw):
    model = make_model(seed=99)  # different init: everything must come from the checkpoint
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW, **kw)
    extra = ck.load(path, model, opt)
    train(model, opt, steps, extra["data_position"])
    return snapshot(model, opt)


def uninterrupted_sharded(rank, world_size, steps, kw):
    model = make_model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdamW8bit, **KW, **kw)
    train(model, opt, steps, 0)
    return snapshot(model, opt)
