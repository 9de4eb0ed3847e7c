"""master_weight_bits on FSDP2 (DTensor) parameters: the local shard's correction, bitwise the unsharded
optimizer's on uneven Shard(0) (shard-edge blocks) and Shard(1) (strided) placements, with gradient
release, through full and plain <-> FSDP2 state dicts, and load_fp32_weights into the shards."""
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

import dist8
from dist8.optim.state_schema import CORRECTION
from dist_utils import run_ranks
from fsdp_utils import assert_same_params, assert_same_state, full_params, mesh_of
from fsdp_utils import full_state as _full_state


def full_state(opt):
    """fsdp_utils.full_state, gathering an int16 correction as int32 (gloo has no int16 collectives)."""
    saved = {}
    for st in opt.state.values():
        c = st.get(CORRECTION)
        if c is not None and c.dtype == torch.int16:
            saved[id(st)] = c
            st[CORRECTION] = c.to(torch.int32)
    try:
        out = _full_state(opt)
    finally:
        for st in opt.state.values():
            if id(st) in saved:
                st[CORRECTION] = saved[id(st)]
    for st in out.values():
        if st.get(CORRECTION) is not None and st[CORRECTION].dtype == torch.int32:
            st[CORRECTION] = st[CORRECTION].to(torch.int16)
    return out

OPTS = {
    "AdamW8bit": (dist8.AdamW8bit, dict(lr=1e-2, weight_decay=0.1)),
    "Lion8bit": (dist8.Lion8bit, dict(lr=1e-3, weight_decay=0.1)),
    "SGD8bit": (dist8.SGD8bit, dict(lr=1e-2, momentum=0.9)),
    "LAMB8bit": (dist8.LAMB8bit, dict(lr=1e-2, weight_decay=0.01)),
}


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(100, 33)  # weight (33, 100): 17/16 rows, a shard edge inside a block
        self.b = nn.Linear(34, 70, bias=False)  # weight (70, 34), sharded on dim 1: strided local elements
        self.c = nn.Parameter(torch.randn(5000))


def _grad(name, shape, step):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    return torch.randn(shape, generator=gen).to(torch.bfloat16)


def _sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    model = Wide().to(torch.bfloat16)
    fully_shard(model, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.shape == (70, 34) else Shard(0))
    return model


def _worker(rank, world_size, fp32_checkpoint):
    from torch.distributed.tensor import distribute_tensor

    mesh = mesh_of(world_size)
    out = {}
    for name, (cls, kw) in OPTS.items():
        for bits in (24, 32):
            model = _sharded_model(mesh)
            ref = {n: nn.Parameter(p.clone()) for n, p in full_params(model).items()}
            kw2 = dict(kw, min_8bit_size=0, master_weight_bits=bits)
            opt = cls(model.named_parameters(), **kw2)
            ref_opt = cls(list(ref.items()), **kw2)
            for step in range(4):
                for n, p in model.named_parameters():
                    g = _grad(n, tuple(p.shape), step)
                    if step == 1 and n in ("b.weight", "c"):  # a skipped block in the strided box; c: the block across the shard edge (2304-2560)
                        g.view(-1)[2400 if n == "c" else 40 * 34 + 20] = float("inf")
                    p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                    ref[n].grad = g.clone()
                opt.step()
                ref_opt.step()
                opt.zero_grad()
                ref_opt.zero_grad()
                if name != "LAMB8bit":
                    assert_same_params(full_params(model), {n: p.detach() for n, p in ref.items()}, f"{name}/{bits}")
            if name == "LAMB8bit":  # trust-ratio norms summed across ranks: equal to float64 rounding
                for n, p in full_params(model).items():
                    torch.testing.assert_close(p.float(), ref[n].detach().float(), rtol=1e-2, atol=1e-3)
                continue
            skips = torch.tensor([opt.nonfinite_skips], dtype=torch.int64)
            dist.all_reduce(skips)
            assert int(skips) == ref_opt.nonfinite_skips >= 2, f"{name}/{bits}: {int(skips)} skips over ranks"
            expected = full_state(ref_opt)
            assert all(st[CORRECTION].dtype == (torch.int8 if bits == 24 else torch.int16) for st in expected.values())
            assert_same_state(full_state(opt), expected, f"{name}/{bits}")
            if name == "AdamW8bit" and bits == 24:
                out["local_correction"] = {n: tuple(opt.state[p][CORRECTION].shape) for n, p in model.named_parameters()}
                _interop(model, opt, ref, ref_opt, mesh, cls, kw2)
    out["release"] = _release(mesh)
    out["fp32_weights"] = _load_fp32_weights(mesh, fp32_checkpoint)
    return out


def _fp32_weights():
    gen = torch.Generator().manual_seed(11)
    return {n: torch.randn(p.shape, generator=gen) * 0.1 for n, p in Wide().named_parameters()}


def _fp32_checkpoint(path):
    """A dist8 checkpoint of an fp32 run holding :func:`_fp32_weights` (its optimizer never stepped)."""
    import dist8.checkpoint as ckpt

    model = Wide()
    model.load_state_dict(_fp32_weights())
    ckpt.save(path, model, dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0))


def _load_fp32_weights(mesh, fp32_checkpoint):
    """dist8.checkpoint.load_fp32_weights into an FSDP2 bf16 model: each rank encodes its local shard
    (uneven Shard(0), strided Shard(1)), bitwise what the unsharded call gives that shard; a plain fp32
    tensor the optimizer does not hold (no correction) is rounded to nearest like the unsharded call.
    ``dist8.checkpoint.load`` of an fp32 run's checkpoint does the same (it rounded the weights and kept
    the group's master_weight_bits=None: pure bf16 from then on)."""
    import dist8.checkpoint as ckpt
    from torch.distributed.tensor import distribute_tensor

    from dist8.checkpoint import load_fp32_weights

    weights = _fp32_weights()
    for bits in (24, 32):
        model = _sharded_model(mesh)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0, master_weight_bits=bits)
        load_fp32_weights(weights, model, opt)
        resumed = _sharded_model(mesh)
        resumed_opt = dist8.AdamW8bit(resumed.named_parameters(), lr=1e-2, min_8bit_size=0, master_weight_bits=bits)
        ckpt.load(fp32_checkpoint, resumed, resumed_opt)
        assert resumed_opt.param_groups[0]["master_weight_bits"] == bits
        for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
            assert torch.equal(p.to_local().view(torch.int16), q.to_local().view(torch.int16)), (n, bits)
            assert torch.equal(opt.state[p][CORRECTION], resumed_opt.state[q][CORRECTION]), (n, bits)
        ref = Wide().to(torch.bfloat16)
        ref_opt = dist8.AdamW8bit(ref.named_parameters(), lr=1e-2, min_8bit_size=0, master_weight_bits=bits)
        load_fp32_weights(weights, ref, ref_opt)
        for n, p in model.named_parameters():
            r = dict(ref.named_parameters())[n]
            want_p = distribute_tensor(r.detach(), p.device_mesh, p.placements, src_data_rank=None).to_local()
            want_c = distribute_tensor(ref_opt.state[r][CORRECTION], p.device_mesh, p.placements,
                                       src_data_rank=None).to_local()
            assert torch.equal(p.to_local().view(torch.int16), want_p.view(torch.int16)), (n, bits)
            assert torch.equal(opt.state[p][CORRECTION], want_c), (n, bits)
            assert opt.state[p][CORRECTION].ne(0).any(), (n, bits)
        plain = _sharded_model(mesh)  # no optimizer: every weight rounded to nearest bf16
        load_fp32_weights(weights, plain)
        for n, p in plain.named_parameters():
            want = distribute_tensor(weights[n].to(torch.bfloat16), p.device_mesh, p.placements,
                                     src_data_rank=None).to_local()
            assert torch.equal(p.to_local(), want), n
    return True


def _interop(model, opt, ref, ref_opt, mesh, cls, kw):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    expected = full_state(ref_opt)
    full = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    assert full["state"]["a.weight"][CORRECTION].shape == (33, 100)
    m2 = _sharded_model(mesh)
    o2 = cls(m2.named_parameters(), **kw)
    set_optimizer_state_dict(m2, o2, full, options=StateDictOptions(full_state_dict=True))
    assert_same_state(full_state(o2), expected, "full state dict round trip")
    m3 = _sharded_model(mesh)
    o3 = cls(m3.named_parameters(), **kw)
    o3.load_state_dict(ref_opt.state_dict())  # unsharded -> FSDP2
    assert_same_state(full_state(o3), expected, "unsharded -> FSDP2")
    plain = cls(list({n: nn.Parameter(p.detach().clone()) for n, p in ref.items()}.items()), **kw)
    plain.load_state_dict(opt.state_dict())  # FSDP2 -> unsharded
    assert_same_state(full_state(plain), expected, "FSDP2 -> unsharded")


def _release(mesh):
    """Gradient release on an FSDP2 bf16 model with a 24-bit master == the normal step, bitwise."""
    from torch.distributed.fsdp import fully_shard

    results = []
    for release in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 64), nn.GELU(), nn.Linear(64, 40)).to(torch.bfloat16)
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0, master_weight_bits=24)
        handle = dist8.gradient_release(model, opt) if release else None
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(8, 40, generator=gen).to(torch.bfloat16)
            model(x).float().square().mean().backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        results.append((full_params(model), full_state(opt)))
    assert_same_params(results[0][0], results[1][0], "gradient release")
    assert_same_state(results[0][1], results[1][1], "gradient release")
    return True


def test_fsdp2_master_weights_exact(tmp_path):
    _fp32_checkpoint(tmp_path / "fp32")
    results = run_ranks(_worker, 2, str(tmp_path / "fp32"), tmp_path=tmp_path)
    for r in results:
        assert r["release"] and r["fp32_weights"]
    # each rank holds the correction of its local shard only
    assert results[0]["local_correction"]["a.weight"] == (17, 100)
    assert results[1]["local_correction"]["a.weight"] == (16, 100)
    assert results[0]["local_correction"]["b.weight"] == (70, 17)


def _steps(params, opt, first, count):
    """Steps with _grad's gradients; ``params`` maps names to (DTensor or plain) parameters."""
    from torch.distributed.tensor import distribute_tensor

    for step in range(first, first + count):
        for n, p in params.items():
            g = _grad(n, tuple(p.shape), step)
            p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) if hasattr(
                p, "device_mesh") else g
        opt.step()
        opt.zero_grad()


def _int16_worker(rank, world_size, path):
    import dist8.checkpoint as ckpt

    model = _sharded_model(mesh_of(world_size))
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0, master_weight_bits=32)
    opt = dist8.AdamW8bit(model.named_parameters(), **kw)
    _steps(dict(model.named_parameters()), opt, 0, 2)
    plain = dist8.AdamW8bit(list({n: nn.Parameter(p.detach().clone()) for n, p in full_params(model).items()}.items()),
                            **kw)
    plain.load_state_dict(opt.state_dict())  # FSDP2 -> unsharded: the int16 corrections gathered
    ckpt.save(path, model, opt, step=2)
    loaded = _sharded_model(mesh_of(world_size))
    loaded_opt = dist8.AdamW8bit(loaded.named_parameters(), **kw)
    ckpt.load(path, loaded, loaded_opt)  # scattered from rank 0 by torch, int16 failed on gloo the same way
    _steps(dict(loaded.named_parameters()), loaded_opt, 2, 2)
    return ({n: st[CORRECTION].clone() for n, st in zip(plain.param_names.values(), plain.state.values())},
            full_params(loaded))


def test_fsdp2_32bit_masters_save_and_gather_over_gloo_and_continue_exactly(tmp_path):
    """master_weight_bits=32 keeps int16 corrections, which gloo cannot all-gather or scatter: dist8.checkpoint
    save and load of an FSDP2 model and loading its state dict into an unsharded optimizer failed with
    'RuntimeError: Invalid scalar type'. int16 now travels as uint8 pairs (dtensor_layout.full_tensor): both work on gloo, and the
    checkpoint continues on one process bitwise as the unsharded run."""
    import dist8.checkpoint as ckpt

    gathered, reloaded = run_ranks(_int16_worker, 2, str(tmp_path / "ck"), tmp_path=tmp_path)[0]
    kw = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0, master_weight_bits=32)
    ref = Wide().to(torch.bfloat16)
    ref_opt = dist8.AdamW8bit(ref.named_parameters(), **kw)
    _steps(dict(ref.named_parameters()), ref_opt, 0, 2)
    for n, p in ref.named_parameters():
        assert torch.equal(gathered[n], ref_opt.state[p][CORRECTION]), n
    loaded = Wide().to(torch.bfloat16)
    loaded_opt = dist8.AdamW8bit(loaded.named_parameters(), **kw)
    ckpt.load(tmp_path / "ck", loaded, loaded_opt)
    for opt_, model in ((ref_opt, ref), (loaded_opt, loaded)):
        _steps(dict(model.named_parameters()), opt_, 2, 2)
    for (n, p), q in zip(ref.named_parameters(), loaded.parameters()):
        assert torch.equal(p, q) and torch.equal(ref_opt.state[p][CORRECTION], loaded_opt.state[q][CORRECTION]), n
        assert torch.equal(p, reloaded[n]), n  # and on 2 ranks


# ---- a cast_model'd transformers Llama under dist8's fully_shard ---------------------------------
def _cast_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1)
    return dist8.cast_model(transformers.LlamaForCausalLM(cfg), torch.bfloat16)  # RMSNorms stay fp32


def _cast_llama_worker(rank, world_size):
    """fsdp.fully_shard per decoder layer and at the root, nothing else: the fp32 RMSNorms inside each
    group become groups of their own; the run (the same batch on every rank) is bitwise the unsharded one."""
    from dist8.integrations import fsdp

    mesh = mesh_of(world_size)
    runs = []
    for sharded in (False, True):
        model = _cast_llama()
        if sharded:
            for layer in model.model.layers:
                fsdp.fully_shard(layer, mesh=mesh)
            fsdp.fully_shard(model, mesh=mesh)
        opt = dist8.AdamW8bit(model.named_parameters(), lr=1e-2, min_8bit_size=0, master_weight_bits=24)
        for step in range(3):
            ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(step))
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        runs.append((full_params(model), full_state(opt)))
    assert_same_params(runs[0][0], runs[1][0], "FSDP2 vs unsharded")
    assert_same_state(runs[0][1], runs[1][1], "FSDP2 vs unsharded")
    norm_dtypes = sorted({str(p.dtype) for n, p in model.named_parameters() if "norm" in n})
    mixed = nn.Linear(4, 4).to(torch.bfloat16)
    mixed.register_parameter("scale", nn.Parameter(torch.ones(4)))  # fp32, not kept by cast_model
    try:
        fsdp.fully_shard(mixed, mesh=mesh)
        refusal = None
    except ValueError as e:
        refusal = str(e)
    return {"norm_dtypes": norm_dtypes, "refusal": refusal}


def test_cast_model_llama_under_fsdp2_is_the_unsharded_run(tmp_path):
    pytest.importorskip("transformers")
    for r in run_ranks(_cast_llama_worker, 2, tmp_path=tmp_path):
        assert r["norm_dtypes"] == ["torch.float32"]
        assert r["refusal"] == ("fully_shard(Linear): its parameters mix bfloat16 (weight) and float32 (scale); FSDP2 "
                                "needs one dtype per fully_shard group: fully_shard the submodules of the other dtype first")
