"""quant_map="fp8": small-float 8-bit codes (e4m3 for signed state, e5m3 for second moments).

The CPU kernel on AVX2 computes these codes from the float bits instead of looking them up
(tests/test_kernels.py::test_fp8_map checks that path and every backend bit for bit); here:
the map itself, its rounding error, the optimizers end to end against the reference backend,
and checkpoints (world-size independent, refused by an optimizer with another map).
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from ckpt_utils import (KW, assert_same, make_model, resume_sharded, save_sharded, snapshot, train,
                        uninterrupted_sharded)
from dist_utils import run_ranks

import dist8
import dist8.checkpoint as ck
from dist8.checkpoint import CheckpointError
from dist8.checkpoint.format import manifest_hash
from dist8.kernels.rules import state_floor_fraction
from dist8.quant import MAP_NAMES, dequantize_blockwise, fp8_map, get_map, quantize_blockwise


def _magnitude(k: int, bias: int) -> float:
    e, m = k >> 3, k & 7
    return 2.0 ** (e - bias) * (1 + m / 8) if e else m * 2.0 ** (1 - bias - 3)


def test_map_values_follow_the_small_float_formula():
    assert "fp8" in MAP_NAMES and torch.equal(get_map("fp8", True), fp8_map(True))
    signed, unsigned = fp8_map(True), fp8_map(False)
    for q in (signed, unsigned):
        assert q.dtype == torch.float32 and q.numel() == 256 and bool((q[1:] > q[:-1]).all())
    for k in range(128):
        assert signed[128 + k].item() == _magnitude(k, 15), k
        assert signed[128 - k - 1].item() == -_magnitude(k + 1, 15), k
    for k in range(256):
        assert unsigned[k].item() == _magnitude(k, 31), k
    # +-1 (a block's absmax element) is exact; the smallest codes are 2^-17 and 2^-33
    assert signed[248].item() == 1.0 and signed[8].item() == -1.0 and unsigned[248].item() == 1.0
    assert signed[129].item() == 2.0 ** -17 and unsigned[1].item() == 2.0 ** -33
    # the second-moment floor: half the smallest positive code
    assert state_floor_fraction(unsigned) == 2.0 ** -34


@pytest.mark.parametrize("signed", [True, False])
def test_round_trip_error_is_half_a_mantissa_step(signed):
    """Values a block holds (|x| / absmax in [2^-14, 1] signed, [2^-30, 1] unsigned) come back
    within 1/16 relative (3 mantissa bits, round to nearest); smaller ones within half a subnormal step."""
    gen = torch.Generator().manual_seed(3)
    lo = -14 if signed else -30
    x = torch.exp2(torch.rand(64 * 1000, generator=gen) * (-lo) + lo)
    if signed:
        x = x * torch.where(torch.rand(x.numel(), generator=gen) < 0.5, -1.0, 1.0)
    x.view(-1, 64)[:, 0] = 1.0  # absmax 1: the normalised values are the values
    q = fp8_map(signed)
    codes, absmax = quantize_blockwise(x, q, 64)
    back = dequantize_blockwise(codes, absmax, q, 64)
    assert float(((back - x).abs() / x.abs()).max()) <= 1 / 16
    tiny = torch.tensor([2.0 ** (lo - 4) * 3.3, 1.0] * 32)
    codes, absmax = quantize_blockwise(tiny, q, 64)
    step = 2.0 ** (-17 if signed else -33)
    assert float((dequantize_blockwise(codes, absmax, q, 64) - tiny).abs().max()) <= step / 2


def _train(cls, steps, backend, monkeypatch, **kw):
    monkeypatch.setenv("DIST8_BACKEND", backend)
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4099, generator=gen))
    opt = cls([p], quant_map="fp8", **kw)
    for step in range(steps):
        g = torch.randn(4099, generator=gen) * 10.0 ** (step % 5 - 3)
        g[(step * 517) % 4000:][:300] = 0  # absent rows: second moments decay towards the floor
        p.grad = g
        opt.step()
    return p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name", ["AdamW8bit", "LAMB8bit", "RMSprop8bit", "Lion8bit", "AdEMAMix8bit", "SGD8bit"])
def test_optimizers_match_the_reference_backend(name, monkeypatch):
    cls = getattr(dist8, name)
    kw = dict(lr=1e-3, min_8bit_size=0, **({"momentum": 0.9} if name == "SGD8bit" else {}))
    p_cpu, s_cpu = _train(cls, 12, "cpu", monkeypatch, **kw)
    p_ref, s_ref = _train(cls, 12, "reference", monkeypatch, **kw)
    assert torch.equal(p_cpu, p_ref), name
    assert s_cpu.keys() == s_ref.keys() and any(v.dtype == torch.uint8 for v in s_cpu.values())
    for k in s_cpu:
        assert torch.equal(s_cpu[k], s_ref[k]), (name, k)


def test_checkpoint_saved_on_2_ranks_resumes_exactly_on_3_and_1(tmp_path):
    path, fp8 = str(tmp_path / "fp8"), {"quant_map": "fp8"}
    run_ranks(save_sharded, 2, path, 6, fp8, tmp_path=tmp_path)
    meta = json.loads(open(os.path.join(path, "metadata.json")).read())
    assert meta["optimizer"]["quant_map"] == "fp8"
    uninterrupted = run_ranks(uninterrupted_sharded, 3, 12, fp8, tmp_path=tmp_path)[0]
    assert_same(run_ranks(resume_sharded, 3, path, 6, fp8, tmp_path=tmp_path)[0], uninterrupted)
    model = make_model(seed=5)  # and into the plain optimizer on one process
    opt = dist8.AdamW8bit(model.named_parameters(), quant_map="fp8", **KW)
    ck.load(path, model, opt)
    train(model, opt, 6, 6)
    assert_same(snapshot(model, opt), uninterrupted)


def test_checkpoint_map_mismatch_and_unknown_map_are_refused(tmp_path):
    model = make_model()
    opt = dist8.AdamW8bit(model.named_parameters(), quant_map="fp8", **KW)
    train(model, opt, 2, 0)
    path = ck.save(str(tmp_path / "c"), model, opt, step=2)
    other = make_model(seed=3)
    with pytest.raises(CheckpointError, match="quant_map='fp8'.*'dynamic'"):
        ck.load(path, other, dist8.AdamW8bit(other.named_parameters(), **KW))
    assert torch.equal(other.w1, make_model(seed=3).w1)  # a refused load changes nothing
    meta_path = os.path.join(path, "metadata.json")
    meta = json.loads(open(meta_path).read())
    meta["optimizer"]["quant_map"] = "fp9"
    meta["manifest_sha256"] = manifest_hash(meta)  # a well-formed checkpoint with an unknown map
    open(meta_path, "w").write(json.dumps(meta))
    with pytest.raises(CheckpointError, match="optimizer.quant_map.*dynamic, linear, fp8.*fp9"):
        ck.load(path, other, dist8.AdamW8bit(other.named_parameters(), quant_map="fp8", **KW))


def test_state_dict_names_its_map_and_another_map_refuses_it(tmp_path):
    """opt.state_dict() carries uint8 codes; it records their map ("dist8": {"quant_map": ...}, kept by
    torch.save/torch.load(weights_only=True)), an optimizer with another map refuses it naming both, and
    export_fp32_adam reads the codes with the recorded map."""
    from dist8.checkpoint.convert import export_fp32_adam

    p = torch.nn.Parameter(torch.randn(5000))
    opt = dist8.AdamW8bit([p], quant_map="fp8")
    for _ in range(3):
        p.grad = torch.randn(5000) * 1e-12
        p.grad[::256] = 1e6  # second moments 2^-100 of their block's absmax: code 0
        opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    sd = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert sd["dist8"] == {"quant_map": "fp8", "rule": "ADAM"} and sd["state"][0]["state1"].dtype == torch.uint8
    other = dist8.AdamW8bit([p])
    with pytest.raises(ValueError, match="quant_map='fp8'.*quant_map='dynamic'"):
        other.load_state_dict(sd)
    assert not other.state  # nothing loaded
    same = dist8.AdamW8bit([p], quant_map="fp8")
    same.load_state_dict(sd)
    assert torch.equal(same.state[p]["state1"], opt.state[p]["state1"])
    exported = export_fp32_adam(sd)["state"][0]
    st = opt.state[p]
    assert torch.equal(exported["exp_avg"], dequantize_blockwise(st["state1"], st["absmax1"], fp8_map(True), 256))
    v = dequantize_blockwise(st["state2"], st["absmax2"], fp8_map(False), 256)
    floor = (st["absmax2"] * 2.0 ** -34).repeat_interleave(256)[:5000]  # code 0 reads as half the smallest code
    assert bool((st["state2"] == 0).any()), "the case the floor is for"
    assert torch.equal(exported["exp_avg_sq"], torch.where(v < floor, floor, v))


def test_bitsandbytes_state_converted_for_dist8_is_refused_by_the_fp8_map():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes not installable here")
    from dist8.checkpoint.convert import from_bitsandbytes

    p = torch.nn.Parameter(torch.randn(5000))
    theirs = bnb.optim.AdamW8bit([p], lr=1e-3)
    p.grad = torch.randn(5000)
    theirs.step()
    converted = from_bitsandbytes(theirs.state_dict())
    assert converted["dist8"] == {"quant_map": "dynamic", "state_signed": {"1": True, "2": False}}
    with pytest.raises(ValueError, match="quant_map='dynamic'.*quant_map='fp8'"):
        dist8.AdamW8bit([p], quant_map="fp8").load_state_dict(converted)
    dist8.AdamW8bit([p]).load_state_dict(converted)  # the dynamic map takes bitsandbytes' codes as they are


def test_deepspeed_segments_of_another_map_are_refused():
    """DeepSpeed's flat-partition state keeps a list of per-segment dicts of codes; the map check looks
    inside them, and DeepSpeedSegments.load_state_dict runs it before installing anything."""
    from dist8.integrations.deepspeed_segments import DeepSpeedSegments
    from dist8.optim.state_schema import check_state_dict_map

    seg = {"state1": torch.zeros(256, dtype=torch.uint8), "absmax1": torch.ones(1), "step": 1}
    sd = {"state": {0: {"segments": [None, seg], "segment_names": ["a", "b"]}}, "param_groups": [],
          "dist8": {"quant_map": "fp8", "block_size": 256}}
    with pytest.raises(ValueError, match="written with quant_map='fp8'.*uses quant_map='dynamic'"):
        check_state_dict_map(sd, "dynamic")
    check_state_dict_map(sd, "fp8")
    check_state_dict_map({k: v for k, v in sd.items() if k != "dist8"}, "dynamic")  # older dicts: as before
    # an engine's optimizer (segments attached) with the default map refuses them before installing anything
    from dist8.integrations.deepspeed_segments import segment_in_place

    p = torch.nn.Parameter(torch.zeros(512))
    opt = segment_in_place(dist8.AdamW8bit([p], min_8bit_size=0))
    assert isinstance(opt, DeepSpeedSegments)
    opt.ds_segments = {p: ["a", "b"]}
    sd["param_groups"] = [dict(opt.state_dict()["param_groups"][0])]
    with pytest.raises(ValueError, match="written with quant_map='fp8'.*uses quant_map='dynamic'"):
        opt.load_state_dict(sd)
    assert not opt.state
