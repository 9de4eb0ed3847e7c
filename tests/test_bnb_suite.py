"""bitsandbytes' own optimizer tests, held against dist8.

``tests/test_optim.py`` of bitsandbytes (read at bitsandbytes-foundation/bitsandbytes, 2026)
checks its optimizers against reference optimizers with fixed protocols and thresholds. A
drop-in replacement has to pass the same checks, so this file runs those protocols, with
bitsandbytes' thresholds, on dist8's classes (the references are torch's optimizers,
bitsandbytes' ``PytorchLARS`` and ``_ReferenceAdEMAMix``, and a Lion written after lion-pytorch,
which is not a dependency):

* ``test_optimizer8bit``: 50 steps of 8-bit state against the 32-bit reference, parameters and
  reference states re-synchronised after every step so that each step's error is measured
  alone: fewer than 20 state values off by more than ``atol=3e-3, rtol=1e-3``; mean absolute
  and relative parameter error below bitsandbytes' bounds per dtype; every 10 steps a
  ``torch.save``/``torch.load`` round trip gives the same codes and parameters close to the
  reference.
* ``test_optimizer32bit``: 20 steps of 32-bit state against the reference, fp32/fp16/bf16
  parameters: states close at bitsandbytes' tolerances, at most 15 parameter values off, a
  state-dict round trip every 4 steps.
* Lion's weight decay is decoupled (``p *= 1 - lr * wd``), a regression bitsandbytes had.
* AdEMAMix saves, loads byte for byte, keeps training finite, and two optimizers loaded from
  one state dict take identical steps (bitsandbytes issue 1382).
* torchao's correctness protocol (an MLP stepped by its 8-bit optimizer and by bitsandbytes'),
  as an accuracy bound: dist8's parameters are no further from the fp32 reference's than
  bitsandbytes' are.

Deviations, on purpose (each documented in the classes' help): dist8's Adam classes add ``weight_decay`` to
the gradient as ``torch.optim.Adam`` does, where bitsandbytes' decay decoupled (its AdamW); dist8 honours
RMSprop's ``momentum``, SGD's ``dampening`` and ``nesterov`` and LAMB's ``adam_w_mode`` and ``bias_correction``,
which bitsandbytes 0.50 takes and ignores; dist8's ``Adagrad8bit``
honours ``optim_bits=32``, as every dist8 ``X8bit`` class does, where bitsandbytes refuses it;
dist8's LARS scales every step by the paper's trust ratio ``max_unorm * |p| / |u|`` where bitsandbytes only clips with it (the two
agree wherever the clip binds, which is the regime of the 32-bit protocol below), so
``max_unorm=0`` is refused rather than meaning "no clip".
"""
import copy
import io
import sys
from pathlib import Path

import pytest
import torch

import dist8.optim as d8
from dist8.quant import dequantize_blockwise

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the [test] extras; its protocols need it")
from bitsandbytes.optim.ademamix import _ReferenceAdEMAMix  # noqa: E402  (bitsandbytes' reference)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import ReferenceLion  # noqa: E402  (the benchmarks' fp32 Lion, one home)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SCHEDULE = 100  # t_alpha = t_beta3 of the scheduled AdEMAMix cases (bitsandbytes' 8-bit value)


def _ademamix_states(state):
    """bitsandbytes' reference stacks (m1, m2) in ``m1_m2``; dist8 keeps m1, nu, m2 as states 1, 2, 3."""
    m1_m2 = state["m1_m2"]
    return {1: m1_m2[0], 2: state["nu"], 3: m1_m2[1]}


# name: (reference factory, dist8 factory, reference state by dist8 state index)
CASES_8BIT = {
    "adam": (torch.optim.Adam, d8.Adam8bit, lambda s: {1: s["exp_avg"], 2: s["exp_avg_sq"]}),
    "lion": (ReferenceLion, d8.Lion8bit, lambda s: {1: s["exp_avg"]}),
    "momentum": (lambda p: torch.optim.SGD(p, 0.01, 0.9), lambda p: d8.SGD8bit(p, 0.01, 0.9),
                 lambda s: {1: s["momentum_buffer"]}),
    "rmsprop": (lambda p: torch.optim.RMSprop(p, 0.01, 0.9), lambda p: d8.RMSprop8bit(p, 0.01, 0.9),
                lambda s: {1: s["square_avg"]}),
    "ademamix": (_ReferenceAdEMAMix, d8.AdEMAMix8bit, _ademamix_states),
    "ademamix_scheduled": (lambda p: _ReferenceAdEMAMix(p, t_alpha=SCHEDULE, t_beta3=SCHEDULE),
                           lambda p: d8.AdEMAMix8bit(p, t_alpha=SCHEDULE, t_beta3=SCHEDULE), _ademamix_states),
}

CASES_32BIT = {
    "adam": (torch.optim.Adam, d8.Adam, lambda s: {1: s["exp_avg"], 2: s["exp_avg_sq"]}),
    "momentum": CASES_8BIT["momentum"][:1] + (lambda p: d8.SGD(p, 0.01, 0.9),) + CASES_8BIT["momentum"][2:],
    "lars": (lambda p: bnb.optim.PytorchLARS(p, 0.01, 0.9), lambda p: d8.LARS(p, 0.01, 0.9),
             lambda s: {1: s["momentum_buffer"]}),
    "rmsprop": CASES_8BIT["rmsprop"][:1] + (lambda p: d8.RMSprop(p, 0.01, 0.9),) + CASES_8BIT["rmsprop"][2:],
    "lion": (ReferenceLion, d8.Lion, lambda s: {1: s["exp_avg"]}),
    "ademamix": (_ReferenceAdEMAMix, d8.AdEMAMix, _ademamix_states),
    "ademamix_scheduled": (lambda p: _ReferenceAdEMAMix(p, t_alpha=20, t_beta3=20),
                           lambda p: d8.AdEMAMix(p, t_alpha=20, t_beta3=20), _ademamix_states),
}


def _not_close(a: torch.Tensor, b: torch.Tensor, atol: float, rtol: float) -> int:
    return int((~torch.isclose(a, b, atol=atol, rtol=rtol)).sum())


def _reloaded(opt, make, p):
    """``opt`` saved with torch.save and loaded into a fresh optimizer from ``make``, as bitsandbytes' tests do."""
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = make([p])
    fresh.load_state_dict(torch.load(buf))
    return fresh


def _dequantized(opt, p, index: int) -> torch.Tensor:
    st = opt.state[p]
    qmap = opt.qmap(p.device, opt.rule_state_signed(index))
    return dequantize_blockwise(st[f"state{index}"], st[f"absmax{index}"], qmap, opt.block_size)


def _shapes(names, dims_fp32, dims_16bit, skip=()):
    """(name, dtype, dim2) cases: bitsandbytes runs dim2 in (32, 1024, 4097) (and 1 at 32 bits) with
    dim1 = 1024 for every dtype; CI keeps its largest tensor (16388 blocks) to float32 to stay short.
    ``skip``: (name, dtype) pairs bitsandbytes' suite leaves out too."""
    return [(n, dt, d) for n in names for dt in DTYPES if (n, dt) not in skip
            for d in (dims_fp32 if dt == torch.float32 else dims_16bit)]


def _pair(make_ref, make, dtype: torch.dtype, dim2: int):
    """bitsandbytes' set-up: a (1024, dim2) parameter of ``dtype`` for dist8 and its float32 copy for the reference."""
    torch.manual_seed(0)
    p2 = torch.randn(1024, dim2, dtype=dtype) * 0.1
    p1 = p2.float().clone()  # a tensor of its own also when p2 is float32
    return p1, p2, make_ref([p1]), make([p2])


# bitsandbytes' 32-bit tolerances (atol, rtol) per parameter dtype
TOLERANCE_32BIT = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-3, 1e-2), torch.float16: (1e-4, 1e-3)}


@pytest.mark.parametrize("name,dtype,dim2", _shapes(CASES_8BIT, (32, 4097), (32,)), ids=str)
def test_optimizer8bit(name, dtype, dim2):
    make_ref, make, ref_states = CASES_8BIT[name]
    p1, p2, ref, opt = _pair(make_ref, make, dtype, dim2)
    patol, prtol = (1e-4, 1e-2) if dtype == torch.bfloat16 else (1e-5, 1e-3)
    err_bound, rel_bound = (0.00017, 0.0016) if dtype == torch.bfloat16 else (0.00006, 0.0006)
    for step in range(50):
        g = torch.randn(1024, dim2, dtype=dtype) * 0.01
        p1.grad, p2.grad = g.float(), g.clone()
        ref.step()
        opt.step()
        dequantized = {}
        for index, ref_state in ref_states(ref.state[p1]).items():
            dequantized[index] = _dequantized(opt, p2, index)
            assert _not_close(ref_state, dequantized[index], 3e-3, 1e-3) < 20, (step, index)
        err = (p1 - p2.float()).abs()
        assert err.mean() <= err_bound, (step, err.mean())
        assert (err / (p1.abs() + 1e-9)).mean() <= rel_bound, step
        if step % 10 == 0 and step > 0:
            codes = {k: v.clone() for k, v in opt.state[p2].items() if torch.is_tensor(v)}
            opt = _reloaded(opt, make, p2)
            for key, value in codes.items():
                assert torch.equal(opt.state[p2][key], value), (step, key)
            assert _not_close(p1, p2.float(), patol, prtol) == 0, step
        # bitsandbytes' resynchronisation: each step's error is measured from the same start
        p1.copy_(p1.to(dtype).float())
        p2.copy_(p1)
        for index, ref_state in ref_states(ref.state[p1]).items():
            ref_state.copy_(dequantized[index])


@pytest.mark.parametrize("name,dtype,dim2", _shapes(CASES_32BIT, (32, 4097, 1), (32, 1),
                                                   skip={(n, torch.bfloat16) for n in ("momentum", "lars", "rmsprop")}),
                         ids=str)
def test_optimizer32bit(name, dtype, dim2):
    make_ref, make, ref_states = CASES_32BIT[name]
    p1, p2, ref, opt = _pair(make_ref, make, dtype, dim2)
    atol, rtol = TOLERANCE_32BIT[dtype]
    steps = 20
    for step in range(steps):
        g = torch.randn(1024, dim2, dtype=dtype) * 0.01
        p1.grad, p2.grad = g.float(), g.clone()
        opt.step()
        ref.step()
        for index, ref_state in ref_states(ref.state[p1]).items():
            torch.testing.assert_close(opt.state[p2][f"state{index}"], ref_state, atol=atol, rtol=rtol)
        assert _not_close(p1, p2.float(), atol, rtol) <= 15, step
        if step % (steps // 5) == 0 and step > 0:
            opt = _reloaded(opt, make, p2)
        if dtype != torch.float32:  # 16-bit parameters drift apart by rounding; bitsandbytes resyncs them
            p1.copy_(p1.to(dtype).float())
            p2.copy_(p1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lion_weight_decay_is_decoupled(dtype):
    p1, p2, ref, opt = _pair(lambda p: ReferenceLion(p, weight_decay=0.1), lambda p: d8.Lion(p, weight_decay=0.1),
                             dtype, 32)
    atol, rtol = TOLERANCE_32BIT[dtype]
    for _ in range(20):
        g = torch.randn(1024, 32, dtype=dtype) * 0.01
        p1.grad, p2.grad = g.float(), g.clone()
        opt.step()
        ref.step()
        assert _not_close(p1, p2.float(), atol, rtol) <= 15
        if dtype != torch.float32:
            p1.copy_(p1.to(dtype).float())
            p2.copy_(p1)


def _linear_after_six_steps(make):
    torch.manual_seed(0)
    model = torch.nn.Linear(128, 64)
    opt = make(model.parameters())
    torch.manual_seed(1)
    for _ in range(6):
        model(torch.randn(16, 128)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.weight.detach()


def test_adam_weight_decay_is_torchs_l2_where_bitsandbytes_decays_decoupled():
    """A documented deviation: bitsandbytes' Adam classes run its AdamW kernel, so their ``weight_decay``
    shrinks the parameter (``p *= 1 - lr * wd``, bitsandbytes issue 2010, whose maintainers lean towards
    correcting it); dist8's Adam classes add it to the gradient, as ``torch.optim.Adam``. Code moving
    from ``bnb.optim.Adam8bit(..., weight_decay=wd)`` keeps its training with ``dist8.AdamW8bit``. If this
    fails on bitsandbytes' side, bitsandbytes changed: update the README's list of differences."""
    kw = {"lr": 1e-2, "weight_decay": 0.5}
    runs = {name: _linear_after_six_steps(lambda ps, cls=cls: cls(ps, **kw)) for name, cls in [
        ("torch Adam", torch.optim.Adam), ("torch AdamW", torch.optim.AdamW), ("dist8 Adam", d8.Adam32bit),
        ("dist8 AdamW", d8.AdamW32bit), ("bnb Adam", bnb.optim.Adam32bit)]}
    close = {(a, b): torch.allclose(runs[a], runs[b], rtol=0, atol=1e-6)
             for a, b in [("dist8 Adam", "torch Adam"), ("dist8 AdamW", "torch AdamW"), ("bnb Adam", "torch AdamW"),
                          ("dist8 Adam", "bnb Adam")]}
    assert close == {("dist8 Adam", "torch Adam"): True, ("dist8 AdamW", "torch AdamW"): True,
                     ("bnb Adam", "torch AdamW"): True, ("dist8 Adam", "bnb Adam"): False}, close
    assert (runs["dist8 Adam"] - runs["bnb Adam"]).abs().max() > 0.05  # not a rounding difference


@pytest.mark.parametrize("ours,theirs,torchs,base,changed", [
    (d8.SGD32bit, bnb.optim.SGD32bit, torch.optim.SGD, {"momentum": 0.9}, {"dampening": 0.5}),
    (d8.SGD32bit, bnb.optim.SGD32bit, torch.optim.SGD, {"momentum": 0.9}, {"nesterov": True}),
    (d8.RMSprop32bit, bnb.optim.RMSprop32bit, torch.optim.RMSprop, {}, {"momentum": 0.9}),
    (d8.LAMB32bit, bnb.optim.LAMB32bit, None, {"weight_decay": 0.1}, {"adam_w_mode": False}),
    (d8.LAMB32bit, bnb.optim.LAMB32bit, None, {}, {"bias_correction": False}),
], ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_arguments_bitsandbytes_takes_and_ignores_are_honoured(ours, theirs, torchs, base, changed):
    """A documented deviation: bitsandbytes 0.50 takes these arguments and steps as if they had their defaults;
    dist8 honours them (as torch's optimizers, where torch has the optimizer)."""
    def run(make, **kw):
        return _linear_after_six_steps(lambda ps: make(ps, lr=1e-2, **base, **kw))

    assert not torch.allclose(run(ours), run(ours, **changed), rtol=0, atol=1e-4)
    assert torch.equal(run(theirs), run(theirs, **changed)), "bitsandbytes honours it now: update the README"
    if torchs is not None:
        torch.testing.assert_close(run(ours, **changed), run(torchs, **changed), rtol=0, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda p: d8.AdEMAMix8bit(p, lr=1e-3), lambda p: d8.AdEMAMix(p, lr=1e-3),
    lambda p: d8.AdEMAMix8bit(p, lr=1e-3, t_alpha=100, t_beta3=100),
    lambda p: d8.AdEMAMix(p, lr=1e-3, t_alpha=100, t_beta3=100),
], ids=["8bit", "32bit", "8bit-scheduled", "32bit-scheduled"])
def test_ademamix_state_dict_round_trip_keeps_training_finite(make):
    torch.manual_seed(42)
    model = torch.nn.Linear(256, 64)
    opt = make(model.parameters())
    for _ in range(10):
        model(torch.randn(8, 256)).sum().backward()
        opt.step()
        opt.zero_grad()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    model2 = torch.nn.Linear(256, 64)
    model2.load_state_dict(saved_model)
    opt2 = make(model2.parameters())
    buf.seek(0)
    saved_opt = torch.load(buf)
    opt2.load_state_dict(saved_opt)
    for p, q in zip(model.parameters(), model2.parameters()):
        for key, value in opt.state[p].items():
            if torch.is_tensor(value):
                assert value.dtype == opt2.state[q][key].dtype and torch.equal(value, opt2.state[q][key]), key
    for _ in range(10):
        loss = model2(torch.randn(8, 256)).sum()
        assert torch.isfinite(loss)
        loss.backward()
        opt2.step()
        opt2.zero_grad()
        assert all(torch.isfinite(p).all() for p in model2.parameters())
    # two optimizers loaded from one state dict take the same step from the same weights
    model.load_state_dict(saved_model)
    model2.load_state_dict(saved_model)
    x = torch.randn(8, 256)
    for m in (model, model2):
        o = make(m.parameters())
        o.load_state_dict(saved_opt)
        m(x).sum().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


# torchao holds its AdamW8bit to bitsandbytes' within 1e-5 on this MLP (2 steps). dist8 is not
# bitwise bitsandbytes on purpose (its 8-bit second moments read a floor, not 0, where their code is
# 0: docs/design.md), so it is held instead to being no further from the fp32 reference than
# bitsandbytes is, in mean and in max, on every seed (measured ratios 0.03-1.00).
ACCURACY_REFERENCES = {
    "Adam8bit": torch.optim.Adam, "AdamW8bit": torch.optim.AdamW, "RMSprop8bit": torch.optim.RMSprop,
    "Adagrad8bit": torch.optim.Adagrad, "SGD8bit": torch.optim.SGD, "Lion8bit": ReferenceLion,
    "AdEMAMix8bit": _ReferenceAdEMAMix,
}


@pytest.mark.parametrize("name", list(ACCURACY_REFERENCES))
def test_8bit_error_against_fp32_is_at_most_bitsandbytes(name):
    kwargs = dict(lr=1e-3, momentum=0.9) if name == "SGD8bit" else dict(lr=1e-3)
    for seed in range(3):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(32, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 128))
        models = [copy.deepcopy(model) for _ in range(3)]
        opts = [ACCURACY_REFERENCES[name](models[0].parameters(), **kwargs),
                getattr(bnb.optim, name)(models[1].parameters(), **kwargs),
                getattr(d8, name)(models[2].parameters(), **kwargs)]
        for _ in range(10):
            x = torch.randn(4, 32)
            for m, opt in zip(models, opts):
                m(x).sum().backward()
                opt.step()
                opt.zero_grad()
        errors = [torch.cat([(a - b).abs().flatten() for a, b in zip(models[0].parameters(), m.parameters())])
                  for m in models[1:]]
        theirs, ours = errors
        assert ours.mean() <= 1.02 * theirs.mean(), (seed, ours.mean().item(), theirs.mean().item())
        assert ours.max() <= 1.02 * theirs.max(), (seed, ours.max().item(), theirs.max().item())


def test_lars_max_unorm_0_is_refused_naming_the_optimizer_that_does_what_bitsandbytes_means():
    """bitsandbytes' LARS with ``max_unorm=0`` does not clip (momentum SGD); dist8's LARS reads
    ``max_unorm`` as the paper's trust coefficient, so 0 would never move: refused, naming SGD8bit."""
    with pytest.raises(ValueError, match="max_unorm.*SGD8bit"):
        d8.LARS8bit([torch.nn.Parameter(torch.randn(64))], lr=0.01, momentum=0.9, max_unorm=0.0)
