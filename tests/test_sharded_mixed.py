"""ShardedOptimizer with parameters of several dtypes (issue 19): dist8.cast_model keeps norm layers fp32 next
to bf16 weights. One flat buffer per dtype, the same block layout and rank ranges as one dtype: sharded ==
unsharded bitwise (stages 1 and 2, with and without master_weight_bits), checkpoints N -> M exact."""
import zlib

import pytest
import torch

import dist8
import dist8.checkpoint as ckpt
from dist8.optim.state_schema import CORRECTION
from dist8.shard import BlockLayout, ShardedOptimizer
from dist8.shard.flat import flat_buffers
from dist_utils import run_ranks

# name -> (shape, dtype), in layout order: dtypes alternate as in a transformer (weights bf16, norms fp32),
# and the sizes put rank edges inside parameters of both dtypes at 2 and 3 ranks.
PARAMS = {
    "emb.weight": ((40, 30), torch.bfloat16),
    "ln1.weight": ((30,), torch.float32),
    "ln1.bias": ((30,), torch.float32),
    "fc.weight": ((17, 60), torch.bfloat16),
    "ln2.weight": ((1000,), torch.float32),
    "head.weight": ((513,), torch.bfloat16),
}
KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)
STEPS = 6


def make_model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for name, (shape, dtype) in PARAMS.items():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)))
    return model


def rank_grad(name, shape, rank, step, dtype):
    """Integers in [-64, 64) / 1024: exact in bf16, and so are their sums over up to 3 ranks (|sum| <= 192
    has at most 8 significant bits), so reducing in bf16 and averaging in fp32 agree."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{step}".encode()))
    return (torch.randint(-64, 64, shape, generator=gen).float() / 1024).to(dtype)


def _backward(model, rank, step):
    loss = sum((p.float() * rank_grad(n, p.shape, rank, step, p.dtype).float()).sum()
               for n, p in model.named_parameters())
    loss.backward()


def _set_mean_grads(model, world_size, step):
    for n, p in model.named_parameters():
        total = sum(rank_grad(n, p.shape, r, step, p.dtype).float() for r in range(world_size))
        p.grad = (total / world_size).to(p.dtype)


def _sharded_run(rank, world_size, stage, bits, steps, first=0, model=None, opt=None):
    model = model or make_model()
    opt = opt or ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=stage,
                                  master_weight_bits=bits, **KW)
    for step in range(first, first + steps):
        opt.zero_grad()
        if stage == 2:
            _backward(model, rank, step)
        else:
            _set_mean_grads(model, world_size, step)
        opt.step()
    return model, opt


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _results(rank, world_size, steps):
    out = {}
    for stage in (1, 2):
        for bits in (None, 24):
            model, opt = _sharded_run(rank, world_size, stage, bits, steps)
            assert {p.dtype for p in model.parameters()} == {torch.bfloat16, torch.float32}
            out[(stage, bits)] = {"params": _params(model), "master_nbytes": opt.master_nbytes(),
                                  "state": opt.consolidated_state_dict(dst=0)}
    return out


def _unsharded(world_sizes, bits):
    """The same training, unsharded, step i averaging the gradients of ``world_sizes[i]`` ranks; without
    master_weight_bits, a ShardedOptimizer on one process (its fp32 master copies of the bf16 parameters
    are what sharding partitions)."""
    model = make_model()
    if bits is None:
        opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=1, **KW)
    else:
        opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=bits, **KW)
    for step, world_size in enumerate(world_sizes):
        opt.zero_grad()
        _set_mean_grads(model, world_size, step)
        opt.step()
    return model, opt


@pytest.mark.parametrize("world_size", [2, 3])
def test_mixed_dtypes_sharded_equals_unsharded_bitwise(tmp_path, world_size):
    results = run_ranks(_results, world_size, STEPS, tmp_path=tmp_path)
    bf16_padded = sum(-(-torch.Size(s).numel() // 256) * 256 for s, dt in PARAMS.values() if dt == torch.bfloat16)
    for (stage, bits) in results[0]:
        ref_model, ref_opt = _unsharded([world_size] * STEPS, bits)
        for r in results:
            for n, p in ref_model.named_parameters():
                got = r[(stage, bits)]["params"][n]
                assert got.dtype == p.dtype and torch.equal(got, p.detach()), (stage, bits, n)
        # fp32 master copies of the bf16 blocks only, each block on one rank; none with the correction
        masters = [r[(stage, bits)]["master_nbytes"] for r in results]
        assert sum(masters) == (4 * bf16_padded if bits is None else 0), masters
        full = results[0][(stage, bits)]["state"]["state"]
        for i, (name, (shape, dtype)) in enumerate(PARAMS.items()):
            has_corr = CORRECTION in full[i]
            assert has_corr == (bits is not None and dtype == torch.bfloat16), (name, stage, bits)
            if bits is not None:
                ref_p = dict(ref_model.named_parameters())[name.replace(".", "_")]
                for key in ("state1", "state2", "absmax1", "absmax2") + ((CORRECTION,) if has_corr else ()):
                    assert torch.equal(full[i][key].reshape(-1), ref_opt.state[ref_p][key].reshape(-1)), (name, key)


def test_flat_buffers_own_one_contiguous_range_per_rank():
    names = list(PARAMS)
    layout = BlockLayout(names, [s for s, _ in PARAMS.values()], 256)
    dtypes = [dt for _, dt in PARAMS.values()]
    for world_size in (1, 2, 3, 4, 7):
        bufs = flat_buffers(layout, dtypes, torch.device("cpu"), world_size)
        assert [b.dtype for b in bufs] == [torch.bfloat16, torch.float32]
        for r, piece_list in enumerate([layout.pieces(r, world_size) for r in range(world_size)]):
            for buf in bufs:
                lo, hi = buf.rank_ranges[r]
                mine = [p for p in piece_list if p.param in buf.members]
                # the rank's pieces of this dtype tile [lo, hi) up to block padding
                assert sum(-(-p.numel // 256) * 256 for p in mine) == hi - lo
                if mine:
                    assert buf.offset[mine[0].param] + mine[0].start == lo
        for buf in bufs:  # rank ranges tile the buffer in order
            edges = [x for rr in buf.rank_ranges for x in rr]
            assert edges[0] == 0 and edges[-1] == buf.flat.numel() and edges == sorted(edges)


# ---- checkpoints: N -> M with mixed dtypes -----------------------------------------------------------
def _save(rank, world_size, path, bits):
    model, opt = _sharded_run(rank, world_size, 2, bits, STEPS // 2)
    ckpt.save(path, model, opt, step=STEPS // 2)


def _load_and_continue(rank, world_size, path, bits):
    model = make_model(seed=7)  # different weights: all must come from the checkpoint
    opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=2, master_weight_bits=bits, **KW)
    ckpt.load(path, model, opt)
    _sharded_run(rank, world_size, 2, bits, STEPS - STEPS // 2, first=STEPS // 2, model=model, opt=opt)
    return _params(model)


@pytest.mark.parametrize("bits", [None, 24])
def test_mixed_dtypes_checkpoint_3_to_2_is_exact(tmp_path, bits):
    """Saved by 3 ranks, resumed on 2: the fp32 masters (or corrections) of the bf16 pieces and the fp32
    parameters' state are re-sliced; the result equals 2 ranks that never stopped (the gradients here
    are the mean over the world, so both runs see the same ones only at one world size)."""
    on3 = tmp_path / "on3"
    run_ranks(_save, 3, str(on3), bits, tmp_path=tmp_path)
    resumed = run_ranks(_load_and_continue, 2, str(on3), bits, tmp_path=tmp_path)
    # reference: 3 ranks' gradients for the first half, then 2 ranks'
    model, _ = _unsharded([3] * (STEPS // 2) + [2] * (STEPS - STEPS // 2), bits)
    for r in resumed:
        for n, p in model.named_parameters():
            assert torch.equal(r[n], p.detach()), (bits, n)
