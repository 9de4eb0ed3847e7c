"""Master-weight encoding (dist8.quant.master): bounds for every value class, and tracking under updates.

* Every finite bf16/fp16 value (both signs, zero, subnormals, max) round-trips
  with correction 0; values between neighbours (ties, near-ties, random
  fractions of the half ulp), fp32 subnormals, random fp32 bit patterns over the
  whole exponent range, near-overflow and saturating values all decode within
  the documented bound ``u(p) = 2**(E(p) - min(t + b, 24))`` (``u/2`` unless clamped);
  the relative bounds of the docstring's table hold for normal ``p``; fp16 + int16
  is bitwise lossless in fp16's normal range; inf/NaN pass through.
* The spec's float64 arithmetic equals the fp32 steps the kernels will run
  (power-of-two scaling in two exact halves, one fp32 add), bit for bit.
* 500 small updates through encode/decode track an fp32 master >100x closer (measured ~690x) than
  plain bf16 rounding, which stalls on updates below half a bf16 ulp.
"""
import pytest
import torch

from dist8.quant.master import (
    check_master_weight_bits,
    correction_unit,
    decode_master,
    encode_master,
    exponent_of,
    master_format,
)

FORMATS = [(torch.bfloat16, 24), (torch.float16, 24), (torch.bfloat16, 32), (torch.float16, 32)]


def all_finite_values(dtype):
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    return bits[torch.isfinite(bits)]


def next_up(p):
    """The neighbour above |p| in p's dtype (as fp32), signed like p."""
    up = torch.nextafter(p.abs(), torch.full_like(p, float("inf"))).float()
    return torch.where(p < 0, -up, up)


def masters_between_neighbours(dtype, gen):
    """fp32 values strictly around every finite value of ``dtype``: ties, near-ties, random fractions."""
    p = all_finite_values(dtype)
    p = p[p.abs() < torch.finfo(dtype).max]
    gap = next_up(p) - p.float()
    fracs = [0.5, 0.4999, 0.5001, 0.999, 0.25, 1e-3] + torch.rand(4, generator=gen).tolist()
    return torch.cat([p.float() + f * gap for f in fracs] + [p.float() - f * gap * 0.5 for f in fracs])


def random_fp32_patterns(n, gen):
    bits = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    v = bits.view(torch.float32)
    return v[torch.isfinite(v)]


def value_classes(dtype, gen):
    fmax = torch.finfo(dtype).max
    tiny = torch.finfo(dtype).tiny
    special = torch.tensor([0.0, -0.0, fmax, -fmax, tiny, -tiny, tiny / 4, 1e-30, -1e-30, 1.4e-45, -1.4e-45,
                            fmax * (1 + 2**-10), -fmax * (1 + 2**-12)], dtype=torch.float32)
    subnormal32 = (torch.randint(1, 2**23, (2000,), generator=gen, dtype=torch.int32)).view(torch.float32)
    near_max = fmax * (1 - torch.rand(2000, generator=gen) * 0.01)
    return {
        "exact values": all_finite_values(dtype).float(),
        "between neighbours": masters_between_neighbours(dtype, gen),
        "fp32 subnormals": torch.cat([subnormal32, -subnormal32]),
        "random fp32 patterns": random_fp32_patterns(200_000, gen),
        "near overflow": torch.cat([near_max, -near_max]),
        "special": special,
    }


@pytest.mark.parametrize("dtype,bits", FORMATS)
def test_round_trip_bound_every_value_class(dtype, bits):
    fmt = master_format(dtype, bits)
    gen = torch.Generator().manual_seed(0)
    for cls, m in value_classes(dtype, gen).items():
        p, c = encode_master(m, dtype, bits)
        assert p.dtype == dtype and c.dtype == fmt.correction_dtype and c.shape == m.shape
        assert torch.isfinite(p).all(), f"{cls}: a finite master gave a non-finite parameter"
        in_range = m.abs() <= fmt.max_finite
        assert torch.equal(p[in_range], m[in_range].to(dtype)), f"{cls}: parameter is not round-to-nearest-even"
        back = decode_master(p, c)
        assert back.dtype == torch.float32
        err = (back.double() - m.double()).abs()
        u = correction_unit(p, fmt)
        bad = in_range & (err > u)
        assert not bad.any(), f"{cls}: {int(bad.sum())} values beyond u(p), e.g. {m[bad][:3].tolist()}"
        unclamped = in_range & (c != fmt.q - 1)
        assert not (unclamped & (err > u / 2)).any(), f"{cls}: unclamped values beyond u(p)/2"
        assert not ((back != 0) & (back.sign() != m.sign())).any(), f"{cls}: sign flipped"
        exact = m == p.float()
        assert (c[exact] == 0).all() and torch.equal(back[exact], m[exact]), f"{cls}: representable values changed"
        # Zero keeps its sign.
        zero = m == 0
        assert torch.equal(torch.signbit(back[zero]), torch.signbit(m[zero]))


@pytest.mark.parametrize("dtype,bits,rel", [(torch.bfloat16, 24, 2**-15), (torch.float16, 24, 2**-18),
                                            (torch.bfloat16, 32, 2**-23)])
def test_relative_bound_for_normal_parameters(dtype, bits, rel):
    fmt = master_format(dtype, bits)
    gen = torch.Generator().manual_seed(1)
    m = torch.cat([masters_between_neighbours(dtype, gen), random_fp32_patterns(200_000, gen)])
    p, c = encode_master(m, dtype, bits)
    normal = (p.abs() >= torch.finfo(dtype).tiny) & (m.abs() <= fmt.max_finite)
    rel_err = ((decode_master(p, c).double() - m.double()).abs() / m.double().abs())[normal]
    bound = rel / (1 - 2.0 ** -(fmt.fraction_bits + 1))
    assert rel_err.max() <= bound
    plain = ((p.double() - m.double()).abs() / m.double().abs())[normal]
    assert plain.max() > 100 * bound  # the correction is what buys the precision


def test_fp16_int16_is_lossless_in_the_normal_range():
    gen = torch.Generator().manual_seed(2)
    m = torch.cat([masters_between_neighbours(torch.float16, gen), random_fp32_patterns(500_000, gen)])
    m = m[(m.abs() >= 2**-14) & (m.abs() <= 65504)]
    p, c = encode_master(m, torch.float16, 32)
    assert torch.equal(decode_master(p, c), m)


@pytest.mark.parametrize("dtype,bits", FORMATS)
def test_non_finite_pass_through(dtype, bits):
    m = torch.tensor([float("inf"), float("-inf"), float("nan")])
    p, c = encode_master(m, dtype, bits)
    assert (c == 0).all()
    back = decode_master(p, c)
    assert back[0] == float("inf") and back[1] == float("-inf") and back[2].isnan()


def _fp32_ldexp(x, k):
    """x * 2**k in fp32 as a kernel does it: two exact power-of-two multiplies (2**k alone may overflow)."""
    k1 = torch.div(k, 2, rounding_mode="floor")
    return x * torch.exp2(k1.float()) * torch.exp2((k - k1).float())


@pytest.mark.parametrize("dtype,bits", FORMATS)
def test_fp32_kernel_arithmetic_equals_the_spec(dtype, bits):
    fmt = master_format(dtype, bits)
    gen = torch.Generator().manual_seed(3)
    m = torch.cat(list(value_classes(dtype, gen).values()))
    p, c = encode_master(m, dtype, bits)
    k = exponent_of(p, fmt) - fmt.shift
    e = m - p.float()  # fp32, exact
    r = _fp32_ldexp(e, -k)
    c32 = torch.round(r).clamp(-fmt.q, fmt.q - 1).to(fmt.correction_dtype)
    assert torch.equal(c32, c)
    d32 = torch.where(c == 0, p.float(), p.float() + _fp32_ldexp(c.float(), k))
    assert torch.equal(d32, decode_master(p, c))


def test_small_updates_track_fp32_master():
    gen = torch.Generator().manual_seed(4)
    n, steps = 1024, 500
    master = torch.randn(n, generator=gen) * 0.02
    p24, c24 = encode_master(master, torch.bfloat16, 24)
    plain = master.to(torch.bfloat16)
    for _ in range(steps):
        delta = torch.randn(n, generator=gen) * 1e-5 - 2e-5  # ~1e-3 of |w| per step (lr ~1e-5), a drift
        master = master + delta
        p24, c24 = encode_master(decode_master(p24, c24) + delta, torch.bfloat16, 24)
        plain = (plain.float() + delta).to(torch.bfloat16)
    err24 = (decode_master(p24, c24) - master).abs().max().item()
    err_plain = (plain.float() - master).abs().max().item()
    drift = 2e-5 * steps  # 1e-2: the true movement
    assert err_plain > 0.5 * drift  # plain bf16 stalls: updates below half an ulp vanish
    assert err24 < err_plain / 100
    assert err24 < drift / 100


def test_argument_checks():
    check_master_weight_bits(None, torch.float32)
    with pytest.raises(ValueError, match="layer.weight is torch.float32; an fp32 parameter is its own master"):
        check_master_weight_bits(24, torch.float32, "layer.weight")
    with pytest.raises(ValueError, match="must be None, 24 or 32"):
        check_master_weight_bits(16, torch.bfloat16)
    with pytest.raises(ValueError, match="must be None, 24 or 32"):
        master_format(torch.bfloat16, True)
    with pytest.raises(TypeError, match="float32"):
        encode_master(torch.zeros(3, dtype=torch.float64), torch.bfloat16, 24)
    p = torch.zeros(4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="correction must be torch.int8"):
        decode_master(p, torch.zeros(4, dtype=torch.int16), 24)
    with pytest.raises(ValueError, match="shape"):
        decode_master(p, torch.zeros(3, dtype=torch.int8))


# ---- master_weight_bits in the optimizers -------------------------------------------------------
import copy  # noqa: E402

import dist8  # noqa: E402
from torch import nn  # noqa: E402


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 96)
        self.ln = nn.LayerNorm(96)
        self.fc2 = nn.Linear(96, 32)

    def forward(self, x):
        return self.fc2(self.ln(torch.relu(self.fc1(x))))


def _model(dtype, seed=0):
    """bf16/fp16 linears (LayerNorm kept fp32, as dist8.cast_model does), or all fp32 from the same values."""
    torch.manual_seed(seed)
    net = _Net()
    if dtype != torch.float32:
        dist8.cast_model(net, dtype)
    return net


def _fp32_twin(net):
    """An fp32 copy holding exactly net's (rounded) values: the fp32-master baseline."""
    twin = _Net()
    twin.load_state_dict({k: v.float() for k, v in net.state_dict().items()})
    return twin


def _train(net, opt, steps, start=0, release=False):
    handle = dist8.gradient_release(net, opt) if release else None
    for s in range(start, start + steps):
        gen = torch.Generator().manual_seed(s)
        x = torch.randn(16, 32, generator=gen)
        loss = (net(x.to(net.fc1.weight.dtype)).float() - x.flip(1)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()


OPT_CASES = {
    "AdamW8bit": lambda ps, **kw: dist8.AdamW8bit(ps, lr=1e-3, min_8bit_size=64, **kw),
    "SGD8bit": lambda ps, **kw: dist8.SGD8bit(ps, lr=1e-2, momentum=0.9, min_8bit_size=64, **kw),
    "Lion8bit": lambda ps, **kw: dist8.Lion8bit(ps, lr=1e-4, min_8bit_size=64, **kw),
    "RMSprop8bit": lambda ps, **kw: dist8.RMSprop8bit(ps, lr=1e-4, min_8bit_size=64, **kw),
    "LAMB8bit": lambda ps, **kw: dist8.LAMB8bit(ps, lr=1e-3, min_8bit_size=64, **kw),
}


def _master_weights(net, opt):
    out = {}
    for name, p in net.named_parameters():
        c = opt.state[p].get("correction")
        out[name] = decode_master(p.detach(), c) if c is not None else p.detach().float()
    return out


@pytest.mark.parametrize("name", ["AdamW8bit", "LAMB8bit"])
def test_bf16_24bit_tracks_the_fp32_master_run(name):
    """100 steps with the same (bf16-valued) gradients: bf16 + 24-bit master stays within a few correction
    units of the same optimizer on fp32 parameters (same start values), far closer than pure bf16."""
    gen = torch.Generator().manual_seed(0)
    start = [(torch.randn(96, 64, generator=gen) * 0.05).to(torch.bfloat16), torch.ones(96)]  # + an fp32 param
    p24 = [nn.Parameter(t.clone()) for t in start]
    ref = [nn.Parameter(t.float()) for t in start]
    plain = [nn.Parameter(t.clone()) for t in start]
    opts = [OPT_CASES[name](p24, master_weight_bits=24), OPT_CASES[name](ref), OPT_CASES[name](plain)]
    for _ in range(100):
        grads = [torch.randn(t.shape, generator=gen).to(t.dtype) for t in start]
        for params, opt in zip((p24, ref, plain), opts):
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            opt.step()
    master = decode_master(p24[0].detach(), opts[0].state[p24[0]]["correction"])
    err24 = (master - ref[0].detach()).abs().max().item()
    err_plain = (plain[0].detach().float() - ref[0].detach()).abs().max().item()
    moved = (ref[0].detach() - start[0].float()).abs().max().item()
    assert err_plain > moved / 10  # pure bf16 loses much of the movement
    assert err24 < err_plain / 100, (err24, err_plain)
    unit = correction_unit(p24[0].detach(), master_format(torch.bfloat16, 24)).max().item()
    assert err24 < 100 * unit  # 100 steps, each re-encoded within u(p)
    assert "correction" not in opts[0].state[p24[1]] and torch.equal(p24[1], ref[1])  # fp32: unaffected


@pytest.mark.parametrize("name", list(OPT_CASES))
@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 24), (torch.float16, 32)], ids=["bf16-24", "fp16-32"])
def test_reference_and_cpu_optimizers_agree_bitwise(name, dtype, bits, monkeypatch):
    """The whole optimizer (batched kernel calls; LAMB's phase 2 in the trust_step kernel) on the reference and CPU backends."""
    runs = []
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("DIST8_BACKEND", backend)
        net = _model(dtype)
        opt = OPT_CASES[name](net.parameters(), master_weight_bits=bits)
        _train(net, opt, 6)
        runs.append((net, opt))
    (n1, o1), (n2, o2) = runs
    for p1, p2 in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(p1.view(torch.uint8) if p1.dtype != torch.float32 else p1, 
                           p2.view(torch.uint8) if p2.dtype != torch.float32 else p2)
        for k, v in o1.state[p1].items():
            assert (v == o2.state[p2][k]) if not isinstance(v, torch.Tensor) else torch.equal(v, o2.state[p2][k]), k


@pytest.mark.parametrize("name", ["AdamW8bit", "LAMB8bit"])
def test_gradient_release_equals_the_normal_step(name):
    runs = []
    for release in (False, True):
        net = _model(torch.bfloat16)
        opt = OPT_CASES[name](net.parameters(), master_weight_bits=24)
        _train(net, opt, 4, release=release)
        runs.append((net, opt))
    (n1, o1), (n2, o2) = runs
    for p1, p2 in zip(n1.parameters(), n2.parameters()):
        assert torch.equal(p1, p2)
        for k, v in o1.state[p1].items():
            assert (v == o2.state[p2][k]) if not isinstance(v, torch.Tensor) else torch.equal(v, o2.state[p2][k]), k


def test_state_dict_round_trip_continues_bitwise():
    net = _model(torch.bfloat16)
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=24)
    _train(net, opt, 3)
    sd = opt.state_dict()
    assert sd["state"][0]["correction"].dtype == torch.int8
    assert sd["param_groups"][0]["master_weight_bits"] == 24
    nbytes = opt.state_nbytes()
    assert nbytes - sum(p.numel() for p in net.parameters() if p.dtype == torch.bfloat16) == \
        sum(v.numel() * v.element_size() for st in opt.state.values() for k, v in st.items()
            if isinstance(v, torch.Tensor) and k != "correction")
    net2 = _model(torch.bfloat16)
    net2.load_state_dict(net.state_dict())
    opt2 = OPT_CASES["AdamW8bit"](net2.parameters())  # the group's master_weight_bits comes with the state dict
    opt2.load_state_dict(copy.deepcopy(sd))  # state_dict() returns the live tensors
    _train(net, opt, 3, start=3)
    _train(net2, opt2, 3, start=3)
    for p1, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p1, p2) and torch.equal(opt.state[p1].get("correction", torch.zeros(0)),
                                                   opt2.state[p2].get("correction", torch.zeros(0)))


def test_changing_the_setting_converts_the_correction():
    net = _model(torch.bfloat16)
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=24)
    _train(net, opt, 2)
    w = net.fc1.weight
    before = decode_master(w.detach(), opt.state[w]["correction"])
    opt.param_groups[0]["master_weight_bits"] = 32
    opt.zero_grad()
    opt.step()  # no gradients: nothing updated, nothing converted
    assert opt.state[w]["correction"].dtype == torch.int8
    _train(net, opt, 1, start=2)
    assert opt.state[w]["correction"].dtype == torch.int16
    assert (decode_master(w.detach(), opt.state[w]["correction"]) - before).abs().max() < 1e-2
    opt.param_groups[0]["master_weight_bits"] = None
    _train(net, opt, 1, start=3)
    assert "correction" not in opt.state[w]


@pytest.mark.parametrize("bits", [24, 32])
@pytest.mark.parametrize("cast", [torch.float32, torch.float16])
def test_a_model_cast_after_bf16_steps_keeps_its_master(bits, cast):
    """``model.float()`` (or ``.half()``) after steps with bf16 parameters: the next step read the correction
    against the new dtype -- dropped for fp32 (up to half a bf16 unit of every value lost: 2.4e-4 here),
    misread for fp16 (2.1e-4 off) -- silently. The master now carries over: written whole into an fp32
    parameter, re-encoded for fp16 (within one correction unit, as any step's re-encoding). lr=0 steps
    move nothing, so the master after the cast and a step is the one before."""
    net = _model(torch.bfloat16)
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=bits)
    _train(net, opt, 3)
    w = net.fc1.weight
    before = decode_master(w.detach(), opt.state[w]["correction"])
    net.to(cast)
    for group in opt.param_groups:
        group["lr"] = 0.0
    w.grad = torch.randn(w.shape, dtype=cast)
    opt.step()
    state = opt.state[w]
    after = w.detach().float() if cast == torch.float32 else decode_master(w.detach(), state["correction"])
    assert ("correction" in state) == (cast != torch.float32)
    if cast == torch.float32 or bits == 32:
        assert torch.equal(after, before)
    else:
        torch.testing.assert_close(after, before, rtol=2**-18, atol=0)
    before = after.clone()
    net.to(torch.bfloat16)  # and back: torch's cast rounds to bf16, and the rounded parameter is the master
    opt.step()
    assert state["correction"].dtype == (torch.int8 if bits == 24 else torch.int16)
    torch.testing.assert_close(decode_master(w.detach(), state["correction"]), w.detach().float(), rtol=0, atol=0)
    torch.testing.assert_close(w.detach().float(), before, rtol=2**-7, atol=0)  # one rounding, two for fp16


@pytest.mark.parametrize("saved,changed", [(24, 32), (32, 24)])
@pytest.mark.parametrize("via", ["state_dict", "checkpoint"])
def test_a_state_saved_between_a_width_change_and_the_next_step_loads_and_continues_exactly(tmp_path, saved,
                                                                                           changed, via):
    """master_weight_bits changed between steps: the live optimizer re-encodes a parameter's correction at its
    next step, so a save in between holds the old width under the new setting. That loads as it is, and the
    next step re-encodes it as the live one does (it was refused: 'correction ... is torch.int16
    (master_weight_bits=32) but the optimizer's master_weight_bits needs torch.int8' -- a run could not
    load its own state dict; found by tests/test_random_lifecycles.py)."""
    import dist8.checkpoint as ckpt

    net = _model(torch.bfloat16)
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=saved)
    _train(net, opt, 2)
    opt.param_groups[0]["master_weight_bits"] = changed
    net2 = _model(torch.bfloat16, seed=1)
    opt2 = OPT_CASES["AdamW8bit"](net2.parameters(), master_weight_bits=saved)
    if via == "checkpoint":
        ckpt.load(ckpt.save(tmp_path / "ck", net, opt, step=2), net2, opt2)
    else:
        net2.load_state_dict(net.state_dict())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["master_weight_bits"] == changed
    _train(net, opt, 2, start=2)
    _train(net2, opt2, 2, start=2)
    want = torch.int8 if changed == 24 else torch.int16
    for (name, p1), p2 in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p1, p2), name
        if p1.dtype == torch.bfloat16:
            assert opt2.state[p2]["correction"].dtype == want, name
            assert torch.equal(opt.state[p1]["correction"], opt2.state[p2]["correction"]), name


@pytest.mark.parametrize("saved,built", [(24, None), (24, 32), (32, 24)])
def test_a_checkpoint_restores_its_master_weight_bits_as_load_state_dict_does(tmp_path, saved, built):
    """dist8.checkpoint.load gives the groups the saved master_weight_bits with the correction saved for it
    (it used to refuse: 'must be a string or null', 'needs torch.int16'), as load_state_dict does. A saved
    None keeps the optimizer's own (next test)."""
    import dist8.checkpoint as ckpt

    net = _model(torch.bfloat16)
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=saved)
    _train(net, opt, 2)
    path = ckpt.save(tmp_path / "ck", net, opt, step=2)
    net2 = _model(torch.bfloat16)
    opt2 = OPT_CASES["AdamW8bit"](net2.parameters(), master_weight_bits=built)
    ckpt.load(path, net2, opt2)
    assert opt2.param_groups[0]["master_weight_bits"] == saved
    _train(net, opt, 2, start=2)
    _train(net2, opt2, 2, start=2)
    for p1, p2 in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p1, p2)


@pytest.mark.parametrize("load", ["checkpoint", "state_dict"])
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16])
def test_a_run_without_corrections_does_not_turn_off_the_optimizers_master_weights(tmp_path, load, saved_dtype):
    """An optimizer built with master_weight_bits=24 resuming a run that had no corrections (fp32
    parameters, or plain bf16 ones) took the saved None and trained pure bf16 from then on, silently.
    It keeps 24 now; its corrections start from the loaded weights, and an fp32 checkpoint's weights
    are encoded into parameter and correction (masters within the 24-bit bound of the fp32 values,
    where a plain cast is off by up to half a bf16 ulp, ~2e-3 relative)."""
    import dist8.checkpoint as ckpt

    net = _model(saved_dtype)
    opt = OPT_CASES["AdamW8bit"](net.parameters())
    _train(net, opt, 2)
    net2 = _model(torch.bfloat16, seed=1)
    opt2 = OPT_CASES["AdamW8bit"](net2.parameters(), master_weight_bits=24)
    if load == "checkpoint":
        ckpt.load(ckpt.save(tmp_path / "ck", net, opt, step=2), net2, opt2)
    else:
        net2.load_state_dict(net.state_dict())
        opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt2.param_groups[0]["master_weight_bits"] == 24
    for (name, p), q in zip(net2.named_parameters(), net.parameters()):
        if p.dtype == torch.float32:
            assert torch.equal(p, q), name
            continue
        master = decode_master(p.detach(), opt2.state[p]["correction"]) if "correction" in opt2.state[p] else p.float()
        if saved_dtype == torch.float32 and load == "checkpoint":  # encoded, not cast
            assert (master - q).abs().max() <= q.abs().max() * 2.0 ** -15, name
            assert (p.float() - q).abs().max() > 0, name  # the cast alone would be this far off
        else:
            assert torch.equal(master, q.detach().bfloat16().float()), name
    _train(net2, opt2, 1, start=2)
    assert all(opt2.state[p]["correction"].dtype == torch.int8 for p in net2.parameters() if p.dtype == torch.bfloat16)


def test_overrides_choose_per_parameter():
    net = _model(torch.bfloat16)
    opt = dist8.AdamW8bit(net.named_parameters(), lr=1e-3, overrides={"fc2.*": {"master_weight_bits": 32}})
    _train(net, opt, 1)
    assert "correction" not in opt.state[net.fc1.weight]
    assert opt.state[net.fc2.weight]["correction"].dtype == torch.int16


def test_refusals_are_one_line_value_errors_naming_the_option():
    fp32 = _model(torch.float32)
    with pytest.raises(ValueError, match=r"^master_weight_bits=24 needs bfloat16/float16 parameters[^\n]*$"):
        dist8.AdamW8bit(fp32.parameters(), master_weight_bits=24)
    net = _model(torch.bfloat16)
    for bad in (16, "24", 24.0, True):
        with pytest.raises(ValueError, match=r"^master_weight_bits must be None, 24 or 32 \(param group 0\)[^\n]*$"):
            dist8.AdamW8bit(net.parameters(), master_weight_bits=bad)
    with pytest.raises(ValueError, match=r"master_weight_bits must be None, 24 or 32 \(override 'fc1\.\*'"):
        dist8.AdamW8bit(net.named_parameters(), overrides={"fc1.*": {"master_weight_bits": 8}})
    opt = dist8.AdamW8bit([net.fc1.weight], master_weight_bits=24)
    with pytest.raises(ValueError, match=r"master_weight_bits must be None, 24 or 32 \(param group 1\)"):
        opt.add_param_group({"params": [net.fc1.bias], "master_weight_bits": 12})
    assert len(opt.param_groups) == 1
    opt_fp32 = dist8.AdamW8bit([fp32.fc1.weight])
    with pytest.raises(ValueError, match="master_weight_bits=32 needs bfloat16/float16"):
        opt_fp32.add_param_group({"params": [fp32.fc1.bias], "master_weight_bits": 32})
    assert len(opt_fp32.param_groups) == 1
    # load_state_dict: a bad value, a correction of the wrong dtype, a correction the parameter cannot keep
    opt = OPT_CASES["AdamW8bit"](net.parameters(), master_weight_bits=24)
    _train(net, opt, 1)
    sd = opt.state_dict()
    bad_groups = {"state": sd["state"], "param_groups": [dict(sd["param_groups"][0], master_weight_bits=20)]}
    with pytest.raises(ValueError, match=r"^master_weight_bits must be None, 24 or 32 \(param group 0 of the loaded"):
        opt.load_state_dict(bad_groups)
    wrong = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": sd["param_groups"]}
    wrong["state"][0]["correction"] = wrong["state"][0]["correction"].to(torch.float32)
    with pytest.raises(ValueError, match=r"^correction of parameter group 0 index 0 is torch.float32; expected an "
                                         r"int8 \(master_weight_bits=24\) or int16 \(32\) tensor$"):
        opt.load_state_dict(wrong)
    off = {"state": sd["state"], "param_groups": [dict(sd["param_groups"][0], master_weight_bits=None)]}
    opt_none = OPT_CASES["AdamW8bit"](net.parameters())  # a saved None keeps the optimizer's None
    with pytest.raises(ValueError, match=r"^state of parameter group 0 index 0 has a correction \(torch.int8\) but "
                                         r"the parameter keeps none: a bf16/fp16 parameter needs the optimizer built "
                                         r"with master_weight_bits=24; an fp32 one [^\n]*load_fp32_weights\)$"):
        opt_none.load_state_dict(off)
    assert not opt_none.state
    assert opt.state[net.fc1.weight]["correction"].dtype == torch.int8  # nothing lost
