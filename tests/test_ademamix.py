"""AdEMAMix / AdEMAMix8bit / AdEMAMix32bit: the published rule, bitsandbytes parity, the warm-up
schedulers, state (three states), checkpoints and sharding.

The float64 reference below is written from the paper (Pagliardini et al. 2024, Algorithm 1) and
does not call dist8's rule code.
"""
from __future__ import annotations

import math

import pytest
import torch

import dist8
import dist8.checkpoint as ck
from dist8.optim.ademamix import alpha_at, beta3_at
from dist8.quant import dequantize_blockwise

BETAS = (0.9, 0.999, 0.9999)


def paper_ademamix(p0, grads, lr, betas, alpha, t_alpha, t_beta3, eps, weight_decay):
    """The published rule in float64: fast EMA m1 (bias-corrected), slow EMA m2 (not), Adam's nu;
    alpha and beta3 warmed up linearly (alpha) and with a linearly growing half-life (beta3)."""
    b1, b2, b3_final = betas
    p = p0.double().clone()
    m1, m2, nu = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        a = min(t * alpha / t_alpha, alpha) if t_alpha else alpha
        if t_beta3:
            s = t / t_beta3
            b3 = min(math.exp(math.log(b1) * math.log(b3_final) / ((1 - s) * math.log(b3_final) + s * math.log(b1))),
                     b3_final)
        else:
            b3 = b3_final
        m1 = b1 * m1 + (1 - b1) * g
        m2 = b3 * m2 + (1 - b3) * g
        nu = b2 * nu + (1 - b2) * g * g
        m1_hat = m1 / (1 - b1**t)
        nu_hat = nu / (1 - b2**t)
        p = p - lr * ((m1_hat + a * m2) / (nu_hat.sqrt() + eps) + weight_decay * p)
    return p


CONFIGS = {
    "plain": dict(lr=1e-2, betas=BETAS, alpha=5.0, t_alpha=None, t_beta3=None, eps=1e-8, weight_decay=0.0),
    "warmup-wd": dict(lr=1e-2, betas=(0.9, 0.99, 0.999), alpha=8.0, t_alpha=10, t_beta3=15, eps=1e-8,
                      weight_decay=0.1),
}


def _grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(steps)]


def _run(cls, p0, grads, **kw):
    p = torch.nn.Parameter(p0.clone())
    opt = cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt


@pytest.mark.parametrize("config", list(CONFIGS))
def test_32bit_equals_the_published_rule(config):
    kw = CONFIGS[config]
    p0 = torch.randn(37, 29, generator=torch.Generator().manual_seed(1))
    grads = _grads(p0.shape, 25)
    got, opt = _run(dist8.AdEMAMix32bit, p0, grads, **kw)
    assert opt.state[opt.param_groups[0]["params"][0]]["state3"].dtype == torch.float32
    expected = paper_ademamix(p0, grads, **kw)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_8bit_tracks_the_published_rule(config):
    """8-bit state: the displacement after 25 steps within 5% (L2) of the float64 rule's."""
    kw = CONFIGS[config]
    p0 = torch.randn(64, 300, generator=torch.Generator().manual_seed(2))
    grads = _grads(p0.shape, 25, seed=3)
    got, opt = _run(dist8.AdEMAMix8bit, p0, grads, min_8bit_size=0, **kw)
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert all(st[f"state{i}"].dtype == torch.uint8 for i in (1, 2, 3))
    expected = paper_ademamix(p0, grads, **kw)
    d_got, d_exp = got.double() - p0.double(), expected - p0.double()
    rel = float((d_got - d_exp).norm() / d_exp.norm())
    assert rel < 0.05, f"relative error of the displacement {rel:.4f}"


# ---- bitsandbytes parity ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [test] extras; parity needs it")


@pytest.mark.parametrize("config", list(CONFIGS))
def test_32bit_equals_bitsandbytes(bnb, config):
    """dist8.AdEMAMix32bit == bnb.optim.AdEMAMix (32-bit; bnb's AdEMAMix32bit fails on CPU in
    bitsandbytes 0.50: its state1 lacks the second EMA), states included."""
    kw = dict(CONFIGS[config])
    p0 = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    grads = _grads(p0.shape, 20, seed=5)
    ours, opt = _run(dist8.AdEMAMix32bit, p0, grads, **kw)
    theirs, bopt = _run(bnb.optim.AdEMAMix, p0, grads, **kw)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    st = opt.state[opt.param_groups[0]["params"][0]]
    bst = bopt.state[bopt.param_groups[0]["params"][0]]
    torch.testing.assert_close(st["state1"], bst["state1"][0], rtol=1e-5, atol=1e-7)  # m1
    torch.testing.assert_close(st["state3"], bst["state1"][1], rtol=1e-5, atol=1e-7)  # m2
    torch.testing.assert_close(st["state2"], bst["state2"], rtol=1e-5, atol=1e-9)  # nu


@pytest.mark.parametrize("config", list(CONFIGS))
def test_8bit_tracks_bitsandbytes(bnb, config):
    """dist8.AdEMAMix8bit vs bnb.optim.AdEMAMix8bit (same maps, block size 256): the displacements
    agree within 2% and the dequantized states closely (the two differ in rounding: dist8 takes the
    exact nearest code and reads nu's code 0 as a floor, see docs/design.md)."""
    kw = dict(CONFIGS[config])
    p0 = torch.randn(8192, generator=torch.Generator().manual_seed(6))
    grads = _grads(p0.shape, 20, seed=7)
    ours, opt = _run(dist8.AdEMAMix8bit, p0, grads, **kw)
    theirs, bopt = _run(bnb.optim.AdEMAMix8bit, p0, grads, **kw)
    d_ours, d_theirs = ours - p0, theirs - p0
    rel = float((d_ours - d_theirs).norm() / d_theirs.norm())
    assert rel < 0.02, f"relative difference of the displacements {rel:.4f}"
    st = opt.state[opt.param_groups[0]["params"][0]]
    bst = bopt.state[bopt.param_groups[0]["params"][0]]
    q_signed, q_unsigned = opt.qmap(p0.device, True), opt.qmap(p0.device, False)
    assert torch.equal(q_signed, bst["qmap1"]) and torch.equal(q_unsigned, bst["qmap2"])
    pairs = [("m1", st["state1"], st["absmax1"], q_signed, bst["state1"][0], bst["absmax1"][0], bst["qmap1"]),
             ("m2", st["state3"], st["absmax3"], q_signed, bst["state1"][1], bst["absmax1"][1], bst["qmap1"]),
             ("nu", st["state2"], st["absmax2"], q_unsigned, bst["state2"], bst["absmax2"], bst["qmap2"])]
    for name, codes, absmax, q, bcodes, babsmax, bq in pairs:
        a = dequantize_blockwise(codes, absmax, q, 256)
        b = dequantize_blockwise(bcodes, babsmax, bq, 256)
        rel = float((a - b).norm() / b.norm())
        assert rel < 0.02, f"{name}: relative difference {rel:.4f}"


@pytest.mark.parametrize("bits", [8, 32])
def test_bitsandbytes_state_dict_converts(bnb, bits):
    """A run started with bitsandbytes' AdEMAMix(8bit) continues in dist8 through from_bitsandbytes:
    bnb's stacked (2, n) state1 becomes state1 = m1 and state3 = m2, codes and absmax unchanged;
    the continued run then tracks bitsandbytes' own continuation (32-bit: equal to rounding)."""
    from dist8.checkpoint.convert import from_bitsandbytes

    kw = dict(CONFIGS["warmup-wd"])
    p0 = torch.randn(8192, generator=torch.Generator().manual_seed(8))
    first, then = _grads(p0.shape, 5, seed=9), _grads(p0.shape, 10, seed=10)
    bnb_cls, cls = (bnb.optim.AdEMAMix8bit, dist8.AdEMAMix8bit) if bits == 8 else (bnb.optim.AdEMAMix,
                                                                                    dist8.AdEMAMix32bit)
    start, bopt = _run(bnb_cls, p0, first, **kw)
    start = start.clone()  # _run returns the live parameter's data; bitsandbytes continues below
    sd = bopt.state_dict()
    raw = dict(sd["state"][0])
    raw.update(raw.pop("__bnb_optimizer_quant_state__", {}))
    assert raw["state1"].shape == (2, 8192)
    converted = from_bitsandbytes(sd)
    live = {t.untyped_storage().data_ptr() for t in raw.values() if torch.is_tensor(t)}
    assert not live & {t.untyped_storage().data_ptr() for t in converted["state"][0].values() if torch.is_tensor(t)}
    p = torch.nn.Parameter(start.clone())
    opt = cls([p], **kw)
    opt.load_state_dict(converted)
    st = opt.state[p]
    assert torch.equal(st["state1"], raw["state1"][0]) and torch.equal(st["state3"], raw["state1"][1])
    assert torch.equal(st["state2"], raw["state2"]) and st["step"] == 5
    if bits == 8:
        assert torch.equal(st["absmax1"], raw["absmax1"][0]) and torch.equal(st["absmax3"], raw["absmax1"][1])
    for g in then:
        p.grad = g.clone()
        opt.step()
    bp = bopt.param_groups[0]["params"][0]
    for g in then:
        bp.grad = g.clone()
        bopt.step()
    d_ours, d_theirs = p.detach() - start, bp.detach() - start
    rel = float((d_ours - d_theirs).norm() / d_theirs.norm())
    assert rel < (0.02 if bits == 8 else 1e-5), f"relative difference of the continued displacements {rel:.2e}"


def test_every_bitsandbytes_ademamix_name_is_in_dist8(bnb):
    for name in ("AdEMAMix", "AdEMAMix8bit", "AdEMAMix32bit"):
        assert getattr(dist8, name) is getattr(dist8.optim, name) and name in dist8.__all__
        assert name in dir(bnb.optim)
    assert dist8.optim.get_optimizer_class("dist8.ademamix8bit") is dist8.AdEMAMix8bit
    with pytest.raises(ValueError, match="is_paged"):
        dist8.AdEMAMix8bit([torch.nn.Parameter(torch.randn(10))], is_paged=True)


# ---- schedulers ---------------------------------------------------------------------------------------
def test_alpha_warmup_values():
    assert [alpha_at(5.0, 10, t) for t in (1, 5, 10, 11, 1000)] == [0.5, 2.5, 5.0, 5.0, 5.0]
    assert alpha_at(5.0, None, 1) == alpha_at(5.0, 0, 1) == 5.0


def test_beta3_warmup_values():
    b1, b3, T = 0.9, 0.9999, 100
    values = [beta3_at(b1, b3, T, t) for t in range(0, 2 * T)]
    assert values[0] == pytest.approx(b1, rel=1e-12)  # starts at beta1 ...
    assert values[T] == pytest.approx(b3, rel=1e-12) and values[-1] == b3  # ... reaches beta3 at T, stays
    assert all(a <= b for a, b in zip(values, values[1:]))
    # the half-life grows linearly in t (the scheduler's definition): ln(0.5)/ln(beta3_t)
    half = [math.log(0.5) / math.log(v) for v in values[1:T]]
    h1, h3 = math.log(0.5) / math.log(b1), math.log(0.5) / math.log(b3)
    for t, h in enumerate(half, start=1):
        s = t / T
        assert h == pytest.approx((1 - s) * h1 + s * h3, rel=1e-9)
    assert beta3_at(b1, b3, None, 7) == beta3_at(b1, b3, 0, 7) == b3


def test_step_hands_the_scheduled_values_to_the_kernel():
    opt = dist8.AdEMAMix8bit([torch.nn.Parameter(torch.randn(10))], betas=(0.8, 0.99, 0.999), alpha=4.0, t_alpha=8,
                             t_beta3=20, lr=0.1, weight_decay=0.5)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    for step in (1, 3, 20, 50):
        c, flags = opt.scalars(hyper, step, 1.0)
        assert flags == 0
        assert c.alpha == alpha_at(4.0, 8, step) and c.beta3 == beta3_at(0.8, 0.999, 20, step)
        assert c.one_minus_beta3 == 1 - c.beta3 and c.decay == 1 - 0.1 * 0.5
        assert c.bc1 == 1 - 0.8**step and c.bc2_sqrt == math.sqrt(1 - 0.99**step) and c.lr == 0.1


# ---- state dict, checkpoint ------------------------------------------------------------------------------
def _model(seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Module()
    for name, shape in {"w": (40, 70), "b": (40,), "tiny": (3,)}.items():
        model.register_parameter(name, torch.nn.Parameter(torch.randn(shape, generator=gen)))
    return model


def _train(model, opt, first, steps):
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(100 + step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


KW = dict(lr=1e-2, t_alpha=5, t_beta3=5, min_8bit_size=100)


@pytest.mark.parametrize("cls", [dist8.AdEMAMix8bit, dist8.AdEMAMix32bit])
def test_state_dict_and_checkpoint_round_trip(cls, tmp_path):
    ref = _model()
    ref_opt = cls(ref.named_parameters(), **KW)
    _train(ref, ref_opt, 0, 10)

    model = _model()
    opt = cls(model.named_parameters(), **KW)
    _train(model, opt, 0, 5)
    ck.save(tmp_path / "ckpt", model, opt, step=5)
    loaded = _model(seed=9)
    loaded_opt = cls(loaded.named_parameters(), **KW)
    ck.load(tmp_path / "ckpt", loaded, loaded_opt)
    twin = _model(seed=9)
    twin_opt = cls(twin.named_parameters(), **KW)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())
    for m, o in ((loaded, loaded_opt), (twin, twin_opt)):
        assert set(o.state[m.w]) >= {"state1", "state2", "state3"}
        _train(m, o, 5, 5)
        for (n, p), q in zip(m.named_parameters(), ref.parameters()):
            assert torch.equal(p, q), n
        for p, q in zip(m.parameters(), ref.parameters()):
            for key, value in ref_opt.state[q].items():
                assert torch.equal(o.state[p][key], value) if torch.is_tensor(value) else o.state[p][key] == value


def test_loading_state_without_state3_is_refused():
    model = _model()
    opt = dist8.AdEMAMix8bit(model.named_parameters(), **KW)
    _train(model, opt, 0, 1)
    sd = opt.state_dict()
    sd["state"] = {k: {key: v for key, v in st.items() if key != "state3"} for k, st in sd["state"].items()}
    with pytest.raises(KeyError, match="state3"):
        dist8.AdEMAMix8bit(_model().named_parameters(), **KW).load_state_dict(sd)
    adam = dist8.AdamW8bit(_model().named_parameters(), min_8bit_size=100)
    sd = opt.state_dict()
    sd["param_groups"] = adam.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="update rule ADEMAMIX; this one's rule ADAM keeps other state"):
        adam.load_state_dict(sd)  # AdEMAMix state into Adam: named, refused
    sd.pop("dist8")  # a dict without dist8's record (passed through a library keeping torch's keys): by its keys
    with pytest.raises(ValueError, match="absmax3.*state3.*ADAM"):
        adam.load_state_dict(sd)


# ---- sharded save, unsharded load ------------------------------------------------------------------------
KW_SHARDED = dict(lr=1e-2, weight_decay=0.1, min_8bit_size=0, t_alpha=3, t_beta3=3)


def _dyadic_train(model, opt, first, steps):
    """Gradients identical on every rank and dyadic: averages over any world size are exact."""
    for step in range(first, first + steps):
        opt.zero_grad()
        gen = torch.Generator().manual_seed(1000 + step)
        grads = {n: torch.randint(-256, 256, p.shape, generator=gen).float() / 512 for n, p in model.named_parameters()}
        sum((p * grads[n]).sum() for n, p in model.named_parameters()).backward()
        opt.step()


def _save_sharded(rank, world_size, path):
    from dist8.shard import ShardedOptimizer

    model = _model()
    opt = ShardedOptimizer(model.named_parameters(), dist8.AdEMAMix8bit, **KW_SHARDED)
    _dyadic_train(model, opt, 0, 5)
    ck.save(path, model, opt, step=5)


def test_sharded_checkpoint_loads_unsharded_bitwise(tmp_path):
    """ShardedOptimizer(AdEMAMix8bit) at 2 ranks saves its three states; one process loads and
    continues bitwise like an uninterrupted unsharded run."""
    from dist_utils import run_ranks

    path = tmp_path / "ckpt"
    run_ranks(_save_sharded, 2, path, tmp_path=tmp_path)
    model = _model(seed=99)
    opt = dist8.AdEMAMix8bit(model.named_parameters(), **KW_SHARDED)
    ck.load(path, model, opt)
    _dyadic_train(model, opt, 5, 5)
    ref = _model()
    ref_opt = dist8.AdEMAMix8bit(ref.named_parameters(), **KW_SHARDED)
    _dyadic_train(ref, ref_opt, 0, 10)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), n
        for key, value in ref_opt.state[q].items():
            got = opt.state[p][key]
            assert torch.equal(got, value) if torch.is_tensor(value) else got == value, f"{n} {key}"


def test_checkpoint_sets_the_warmup_lengths_and_checks_them(tmp_path):
    """t_alpha / t_beta3 are None or an integer: a checkpoint may carry either into an optimizer built
    with the other; a bad value is refused naming the key."""
    import json

    model = _model()
    opt = dist8.AdEMAMix8bit(model.named_parameters(), lr=1e-2, t_alpha=7, t_beta3=None)
    _train(model, opt, 0, 1)
    ck.save(tmp_path / "a", model, opt, step=1)
    other = dist8.AdEMAMix8bit(_model().named_parameters(), lr=1e-2, t_alpha=None, t_beta3=9)
    ck.load(tmp_path / "a", _model(), other)
    assert other.param_groups[0]["t_alpha"] == 7 and other.param_groups[0]["t_beta3"] is None
    meta_path = tmp_path / "a" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    assert meta["optimizer"]["param_groups"][0]["t_alpha"] == 7
    with pytest.raises(ValueError, match="t_alpha"):  # the optimizer's own check, on load_state_dict
        sd = opt.state_dict()
        sd["param_groups"][0] = dict(sd["param_groups"][0], t_alpha=-3)
        dist8.AdEMAMix8bit(_model().named_parameters(), lr=1e-2).load_state_dict(sd)
