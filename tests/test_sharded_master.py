"""master_weight_bits with ShardedOptimizer and dist8.checkpoint (issue 19): the correction is partitioned
like state (sharded == unsharded bitwise, stages 1 and 2), saved world-size independently (N -> M exact),
validated on load, consolidated to fp32 weights, and re-encoded from fp32 weights."""
import json
import zlib

import pytest
import torch
import torch.distributed as dist

import dist8
import dist8.checkpoint as ckpt
from dist8.checkpoint import CheckpointError
from dist8.optim.state_schema import CORRECTION
from dist8.quant.master import decode_master
from dist8.shard import ShardedOptimizer
from dist_utils import run_ranks

SHAPES = {"a.weight": (33, 100), "a.bias": (33,), "b.weight": (7, 300), "c": (1,), "e": (513,)}
KW = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0)
STEPS = 6


def make_model(dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for name, shape in SHAPES.items():
        model.register_parameter(name.replace(".", "_"), torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)))
    return model


def rank_grad(name, shape, rank, step, dtype=torch.bfloat16):
    """Integers of at most 8 significant bits / 1024: exact in bf16, and so are their sums over 2 ranks."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{rank}/{step}".encode()))
    return (torch.randint(-128, 128, shape, generator=gen).float() / 1024).to(dtype)


def _backward(model, rank, step):
    loss = sum((p.float() * rank_grad(n, p.shape, rank, step).float()).sum() for n, p in model.named_parameters())
    loss.backward()


def _set_mean_grads(model, world_size, step):
    for n, p in model.named_parameters():
        p.grad = (sum(rank_grad(n, p.shape, r, step).float() for r in range(world_size)) / world_size).to(p.dtype)


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


def _reference(world_size, bits, steps):
    model = make_model()
    opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=bits, **KW)
    for step in range(steps):
        _set_mean_grads(model, world_size, step)
        opt.step()
        opt.zero_grad()
    return model, opt


def _full_corrections(opt: ShardedOptimizer) -> dict[int, torch.Tensor]:
    full = opt.consolidated_state_dict(dst=0)
    return {i: st[CORRECTION].clone() for i, st in (full or {"state": {}})["state"].items()}


def _sharded_results(rank, world_size, steps):
    out = {}
    for stage in (1, 2):
        for bits in (24, 32):
            model, opt = _sharded_run(rank, world_size, stage, bits, steps)
            assert opt.master_nbytes() == 0  # the correction replaces the fp32 master copy
            out[(stage, bits)] = {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
                                  "corrections": _full_corrections(opt), "nbytes": opt.state_nbytes()}
    return out


def test_sharded_equals_unsharded_bitwise_with_correction(tmp_path):
    results = run_ranks(_sharded_results, 2, STEPS, tmp_path=tmp_path)
    for (stage, bits), _ in results[0].items():
        ref_model, ref_opt = _reference(2, bits, STEPS)
        ref_params = list(ref_model.parameters())
        for r in results:
            for n, p in ref_model.named_parameters():
                assert torch.equal(r[(stage, bits)]["params"][n], p.detach()), (stage, bits, n, "rank")
        corrections = results[0][(stage, bits)]["corrections"]
        for i, p in enumerate(ref_params):
            ref_c = ref_opt.state[p][CORRECTION]
            assert ref_c.dtype == (torch.int8 if bits == 24 else torch.int16)
            assert torch.equal(corrections[i].view(p.shape), ref_c), (stage, bits, i)
            assert bool((ref_c != 0).any())  # the correction is in use
    # the correction is partitioned: int16 costs one byte more than int8 per value, each value on one rank
    n = sum(torch.Size(s).numel() for s in SHAPES.values())
    extra = [r[(2, 32)]["nbytes"] - r[(2, 24)]["nbytes"] for r in results]
    assert sum(extra) == n and all(0 < e < n for e in extra), extra


def test_sharded_refuses_mixed_master_weight_bits():
    model = make_model()
    params = list(model.named_parameters())
    with pytest.raises(ValueError, match="one master_weight_bits for all parameter groups"):
        ShardedOptimizer([{"params": params[:2], "master_weight_bits": 24}, {"params": params[2:]}],
                         dist8.AdamW8bit, **KW)
    with pytest.raises(ValueError, match="master_weight_bits=24 needs bfloat16/float16 parameters"):
        ShardedOptimizer(list(make_model(torch.float32).named_parameters()), dist8.AdamW8bit,
                         master_weight_bits=24, **KW)
    # a parameter's own setting (name override or module mark): the groups' or refused, naming it
    # (was: "all parameters are float32", the inner optimizer seeing the fp32 master copies)
    with pytest.raises(ValueError, match="parameter a_weight has 24 from overrides"):
        ShardedOptimizer(list(make_model().named_parameters()), dist8.AdamW8bit,
                         overrides={"a_weight": {"master_weight_bits": 24}}, **KW)
    with pytest.raises(ValueError, match=r"parameter b_weight has 32 from overrides .*\(the groups': 24\)"):
        ShardedOptimizer(list(make_model().named_parameters()), dist8.AdamW8bit, master_weight_bits=24,
                         overrides={"b_*": {"master_weight_bits": 32}}, **KW)
    model = make_model()
    dist8.GlobalOptimManager.get_instance().register_module_override(model, "e", {"master_weight_bits": 32})
    with pytest.raises(ValueError, match="parameter e has 32 from overrides or a module mark"):
        ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, master_weight_bits=24, **KW)
    opt = ShardedOptimizer(list(make_model().named_parameters()), dist8.AdamW8bit, master_weight_bits=24,
                           overrides={"b_*": {"master_weight_bits": 24, "lr": 0.1}}, **KW)
    assert opt.master_nbytes() == 0
    # built with None (fp32 master copies): a later 24 in the groups changed nothing, silently, until 2026-12-04
    model = make_model()
    opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, **KW)
    assert opt.master_nbytes() > 0
    opt.param_groups[0]["master_weight_bits"] = 24
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match=r"param group 0 has master_weight_bits=24, but this ShardedOptimizer was "
                                         r"built with master_weight_bits=None .* build it with master_weight_bits=24"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.param_groups[0]["master_weight_bits"] = None
    opt.step()  # taken back: steps


def _one_block_run(rank, world_size, stage):
    """One bf16 parameter of one block: one rank owns it, the other owns nothing."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    opt = ShardedOptimizer([("w", model.w)], dist8.AdamW8bit, stage=stage, master_weight_bits=24, **KW)
    _sharded_run(rank, world_size, stage, 24, 3, model=model, opt=opt)
    return {"pieces": len(opt.pieces), "w": model.w.detach().clone()}


@pytest.mark.parametrize("stage", [1, 2])
def test_a_rank_that_owns_no_block_takes_master_weight_bits(tmp_path, stage):
    """A rank whose range is empty builds an inner optimizer without parameters; the check that
    master_weight_bits meets a bf16/fp16 parameter is made on all parameters, on every rank
    (it used to refuse on the empty rank while the other waited in the next collective)."""
    results = run_ranks(_one_block_run, 2, stage, tmp_path=tmp_path)
    assert sorted(r["pieces"] for r in results) == [0, 1]
    ref = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    opt = dist8.AdamW8bit([("w", ref)], master_weight_bits=24, **KW)
    for step in range(3):
        ref.grad = (sum(rank_grad("w", ref.shape, r, step).float() for r in range(2)) / 2).to(ref.dtype)
        opt.step()
    for r in results:
        assert torch.equal(r["w"], ref.detach())


# ---- checkpoints: N -> M with the correction --------------------------------------------------
def _save_sharded(rank, world_size, path):
    model, opt = _sharded_run(rank, world_size, 2, 24, STEPS // 2)
    ckpt.save(path, model, opt, step=STEPS // 2)
    return None


def _load_sharded_and_continue(rank, world_size, path):
    model = make_model(seed=7)  # different weights: all must come from the checkpoint
    # A plain optimizer takes the checkpoint's master_weight_bits (as load_state_dict does); ShardedOptimizer
    # chooses its fp32 master copies when it is built, so a different value is refused, changing nothing.
    without = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=1, **KW)
    with pytest.raises(CheckpointError, match="param group 0 was saved with master_weight_bits=24, this "
                                              "ShardedOptimizer was built with None"):
        ckpt.load(path, model, without)
    assert not without.shard_state()
    # built with 32: the corrections of the other width load, and the group takes the saved 24 (the step
    # re-encodes, as after a live change 32 -> 24; it was refused as a change of master copies)
    other = make_model(seed=8)
    wider = ShardedOptimizer(list(other.named_parameters()), dist8.AdamW8bit, stage=1, master_weight_bits=32, **KW)
    ckpt.load(path, other, wider)
    assert wider.param_groups[0]["master_weight_bits"] == 24
    assert all(st["correction"].dtype == torch.int8 for st in wider.shard_state().values() if "correction" in st)
    opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=2, master_weight_bits=24, **KW)
    ckpt.load(path, model, opt)
    _sharded_run(rank, world_size, 2, 24, STEPS - STEPS // 2, first=STEPS // 2, model=model, opt=opt)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _save_sharded_with_fp32_masters(rank, world_size, path):
    model, opt = _sharded_run(rank, world_size, 1, None, 3)  # bf16 parameters, fp32 master copies
    ckpt.save(path, model, opt, step=3)
    return {i: opt.master_piece(piece).clone() for i, piece in enumerate(opt.pieces)}


@pytest.mark.parametrize("bits", [32, 24, None])
def test_fp32_master_copies_of_a_sharded_checkpoint_go_into_a_plain_optimizers_correction(tmp_path, bits):
    """A ShardedOptimizer over bf16 parameters keeps fp32 master copies and saves them; loaded into a plain
    optimizer they were dropped, silently: it went on from the bf16-rounded weights (up to half a bf16 unit off).
    They are encoded into parameter and correction now, within the bound of master_weight_bits' encoding;
    without master_weight_bits only the rounded weight can be kept."""
    path = tmp_path / "ck"
    run_ranks(_save_sharded_with_fp32_masters, 2, str(path), tmp_path=tmp_path)
    from safetensors.torch import load_file

    masters: dict = {}
    for r in range(2):
        for key, t in load_file(str(path / f"optim-{r:05d}-of-00002.safetensors")).items():
            if key.endswith("::master"):
                masters.setdefault(key.split("::")[0], []).append(t)
    masters = {n: torch.cat(ts) for n, ts in masters.items()}
    model = make_model(seed=7)
    opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=bits, **KW)
    ckpt.load(path, model, opt)
    assert masters and set(masters) <= {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        if n not in masters:
            continue
        want = masters[n].view(p.shape)
        if bits is None:
            assert CORRECTION not in opt.state[p] and torch.equal(p.float(), want.bfloat16().float()), n
            continue
        got = decode_master(p.detach(), opt.state[p][CORRECTION])  # bf16 + int16: fp32's bits but at binade edges
        torch.testing.assert_close(got, want, rtol=2**-22 if bits == 32 else 2**-15, atol=0, msg=n)


def _plain_continue(model, opt, first, steps, world_size=2):
    for step in range(first, first + steps):
        _set_mean_grads(model, world_size, step)
        opt.step()
        opt.zero_grad()


def test_checkpoint_2_to_1_and_back_is_exact_with_correction(tmp_path):
    on2 = tmp_path / "on2"
    run_ranks(_save_sharded, 2, str(on2), tmp_path=tmp_path)
    meta = json.loads((on2 / "metadata.json").read_text())
    assert all(p["state"].get(CORRECTION) == "int8" for p in meta["params"])
    ref_model, _ = _reference(2, 24, STEPS)

    # 2 -> 1: a plain optimizer on one process continues exactly
    model = make_model(seed=7)
    opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=24, **KW)
    ckpt.load(on2, model, opt)
    assert all(st[CORRECTION].dtype == torch.int8 for st in opt.state.values())
    on1 = tmp_path / "on1"
    ckpt.save(on1, model, opt, step=STEPS // 2)
    _plain_continue(model, opt, STEPS // 2, STEPS - STEPS // 2)
    for (n, p), q in zip(ref_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n

    # 1 -> 2: back onto two ranks of ShardedOptimizer
    resumed = run_ranks(_load_sharded_and_continue, 2, str(on1), tmp_path=tmp_path)
    for r in resumed:
        for n, p in ref_model.named_parameters():
            assert torch.equal(r[n], p.detach()), n


def _one_process_checkpoint(tmp_path, bits=24):
    model = make_model()
    opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=bits, **KW)
    _plain_continue(model, opt, 0, 2)
    path = tmp_path / "ck"
    ckpt.save(path, model, opt, step=2)
    return model, opt, path


def test_an_fp32_sharded_optimizer_loads_a_checkpoint_whatever_its_master_weight_bits(tmp_path):
    """fp32 parameters are their own masters: a ShardedOptimizer over them keeps no master copies with any
    master_weight_bits, so a checkpoint whose group says 32 (set after construction; the step ignores it for
    fp32 parameters) loads into one built with None (it was refused as a change of master copies)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = ShardedOptimizer(model.parameters(), dist8.AdamW8bit, lr=1e-3, min_8bit_size=100)
    for _ in range(2):
        model(torch.ones(2, 64)).sum().backward()
        opt.step()
        opt.param_groups[0]["master_weight_bits"] = 32
    path = ckpt.save(tmp_path / "ck", model, opt, step=2)
    other = torch.nn.Linear(64, 64)
    loaded = ShardedOptimizer(other.parameters(), dist8.AdamW8bit, lr=1e-3, min_8bit_size=100)
    ckpt.load(path, other, loaded)
    assert loaded.param_groups[0]["master_weight_bits"] == 32
    assert all(torch.equal(p, q) for p, q in zip(other.parameters(), model.parameters()))


def test_correction_is_validated_on_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from dist8.checkpoint.format import file_entry, read_metadata, write_metadata

    _, _, path = _one_process_checkpoint(tmp_path)
    fname = "optim-00000-of-00001.safetensors"

    def tamper(edit, meta_edit=None):
        bad = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        import shutil

        shutil.copytree(path, bad)
        tensors = load_file(str(bad / fname))
        edit(tensors)
        save_file(tensors, str(bad / fname))
        meta = read_metadata(bad)
        meta["files"][fname] = file_entry(bad / fname)
        if meta_edit:
            meta_edit(meta)
        write_metadata(bad, meta)
        return bad

    key = "a_weight::correction"
    cases = [
        (lambda t: t.__setitem__(key, t[key].float()), None, "tensor a_weight::correction has dtype float32, expected int8"),
        (lambda t: t.__setitem__(key, t[key][:-1].clone()), None, "tensor a_weight::correction has shape [3299]"),
    ]
    for edit, meta_edit, expected in cases:
        bad = tamper(edit, meta_edit)
        model = make_model(seed=3)
        opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=24, **KW)
        with pytest.raises(CheckpointError) as info:
            ckpt.load(bad, model, opt)
        msg = str(info.value)
        assert "\n" not in msg and expected in msg, msg
        assert not opt.state  # nothing installed
    # a correction of the other width, declared so: what a save between a change of master_weight_bits and
    # the parameter's next step holds; it loads as it is and that step re-encodes it (the live optimizer's way)
    wider = tamper(lambda t: t.__setitem__(key, t[key].to(torch.int16)),
                   lambda m: m["params"][0]["state"].__setitem__("correction", "int16"))
    model = make_model(seed=3)
    opt = dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=24, **KW)
    ckpt.load(wider, model, opt)
    assert opt.state[model.a_weight]["correction"].dtype == torch.int16
    # metadata declaring another dtype for the correction (hash fixed up, as an editor would)
    from dist8.checkpoint.format import manifest_hash

    bad = tmp_path / "bad-meta"
    import shutil

    shutil.copytree(path, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    meta["params"][0]["state"]["correction"] = "uint8"
    meta["manifest_sha256"] = manifest_hash(meta)
    (bad / "metadata.json").write_text(json.dumps(meta))
    model = make_model(seed=3)
    with pytest.raises(CheckpointError, match=r"metadata.json: params\[0\].state.'correction' must be one of"):
        ckpt.load(bad, model, dist8.AdamW8bit(list(model.named_parameters()), master_weight_bits=24, **KW))


def test_consolidate_fp32_weights_and_load_them_back(tmp_path, capsys):
    from safetensors.torch import load_file

    from dist8.cli import main

    model, opt, path = _one_process_checkpoint(tmp_path)
    out = tmp_path / "fp32"
    assert main(["ckpt", "consolidate", str(path), str(out), "--fp32-weights"]) == 0
    assert "model-fp32.safetensors" in capsys.readouterr().out
    assert main(["ckpt", "verify", str(out)]) == 0
    weights = load_file(str(out / "model-fp32.safetensors"))
    for n, p in model.named_parameters():
        assert weights[n].dtype == torch.float32
        assert torch.equal(weights[n], decode_master(p.detach(), opt.state[p][CORRECTION]))

    # fp32 weights into a bf16 model with master_weight_bits: the correction is re-encoded, exactly
    fresh = make_model(seed=5)
    fresh_opt = dist8.AdamW8bit(list(fresh.named_parameters()), master_weight_bits=24, **KW)
    ckpt.load_fp32_weights(out / "model-fp32.safetensors", fresh, fresh_opt)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        # the same fp32 masters bit for bit (pairs decoding to the same value may differ)
        assert torch.equal(decode_master(q.detach(), fresh_opt.state[q][CORRECTION]), weights[n]), n
        assert torch.equal(decode_master(q.detach(), fresh_opt.state[q][CORRECTION]),
                           decode_master(p.detach(), opt.state[p][CORRECTION])), n
    # checkpoint (moments) + fp32 weights continue exactly like the checkpoint alone
    ckpt.load(path, fresh, fresh_opt)
    ckpt.load_fp32_weights(out / "model-fp32.safetensors", fresh, fresh_opt)
    ref = make_model(seed=9)
    ref_opt = dist8.AdamW8bit(list(ref.named_parameters()), master_weight_bits=24, **KW)
    ckpt.load(path, ref, ref_opt)
    _plain_continue(ref, ref_opt, 2, 2)
    _plain_continue(fresh, fresh_opt, 2, 2)
    for (n, p), q in zip(ref.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q) and torch.equal(ref_opt.state[p][CORRECTION], fresh_opt.state[q][CORRECTION]), n
    with pytest.raises(CheckpointError, match="model-fp32.safetensors.*b_weight has shape"):
        other = make_model()
        other.b_weight = torch.nn.Parameter(torch.zeros(3, 3, dtype=torch.bfloat16))
        ckpt.load_fp32_weights(out / "model-fp32.safetensors", other,
                               dist8.AdamW8bit(list(other.named_parameters()), master_weight_bits=24, **KW))


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 24), (torch.float16, 24), (torch.bfloat16, 32)])
def test_encode_master_exact_round_trips_every_pair(dtype, bits):
    from dist8.quant.master import encode_master, encode_master_exact, master_format

    fmt = master_format(dtype, bits)
    gen = torch.Generator().manual_seed(1)
    param = (torch.randn(20000, generator=gen) * 3).to(dtype)
    correction = torch.randint(-fmt.q, fmt.q, (20000,), generator=gen).to(fmt.correction_dtype)
    correction[::7] = -fmt.q  # the pairs whose decoded value is a midpoint
    master = decode_master(param, correction, bits)
    assert not torch.equal(decode_master(*encode_master(master, dtype, bits), bits), master)  # RNE loses some
    p2, c2 = encode_master_exact(master, dtype, bits)
    assert torch.equal(decode_master(p2, c2, bits), master)
    plain_p, plain_c = encode_master(master, dtype, bits)
    same = decode_master(plain_p, plain_c, bits) == master
    assert torch.equal(p2[same], plain_p[same]) and torch.equal(c2[same], plain_c[same])  # only the lost ones change


def _fp32_checkpoint_into_bf16(rank, world_size, path, bits):
    model = make_model(torch.bfloat16, seed=3)
    opt = ShardedOptimizer(list(model.named_parameters()), dist8.AdamW8bit, stage=2, master_weight_bits=bits, **KW)
    ckpt.load(path, model, opt)
    assert opt.param_groups[0]["master_weight_bits"] == bits
    masters = {}
    for piece, view in zip(opt.pieces, opt._piece_views):
        if bits is None:
            value = opt.master_piece(piece).clone()
        else:
            flat = opt.params[piece.param].detach().reshape(-1)[piece.start:piece.stop]
            value = decode_master(flat, opt.inner.state[view][CORRECTION].reshape(-1))
        masters[(piece.param, piece.start, piece.stop)] = value
    return masters


@pytest.mark.parametrize("bits", [None, 24])
def test_an_fp32_checkpoint_gives_a_bf16_sharded_model_its_fp32_values(tmp_path, bits):
    """A checkpoint of fp32 parameters loaded into a bf16 model under ShardedOptimizer: the masters (its
    fp32 copies, or master_weight_bits' corrections) were those of the bf16-rounded weights (up to half a
    bf16 ulp off), and with master_weight_bits=24 the load was refused ('saved with None'). Now the
    fp32 weights are encoded into them, on each rank for its own pieces."""
    fp32 = make_model(torch.float32)
    opt = dist8.AdamW8bit(list(fp32.named_parameters()), **KW)
    _plain_continue(fp32, opt, 0, 2)
    path = tmp_path / "fp32"
    ckpt.save(path, fp32, opt, step=2)
    weights = [p.detach().reshape(-1) for p in fp32.parameters()]
    for masters in run_ranks(_fp32_checkpoint_into_bf16, 2, str(path), bits, tmp_path=tmp_path):
        assert masters
        for (i, start, stop), value in masters.items():
            want = weights[i][start:stop]
            if bits is None:
                assert torch.equal(value, want), i
            else:
                assert (value - want).abs().max() <= want.abs().max() * 2.0 ** -15, i
            assert not torch.equal(want.bfloat16().float(), want)  # what a cast alone would have kept
