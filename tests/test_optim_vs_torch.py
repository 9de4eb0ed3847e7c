"""32-bit mode equals torch's optimizers; 8-bit tracks its 32-bit counterpart."""

import pytest
import torch

from dist8.quant import dequantize_blockwise
from optim_cases import CASES

TORCH_CASES = [k for k, case in CASES.items() if case.torch_cls is not None]


@pytest.mark.parametrize("name", TORCH_CASES)
def test_32bit_equals_torch(name):
    cls, kw, tcls, tkw = CASES[name]
    torch.manual_seed(0)
    p = torch.randn(37, 29, requires_grad=True)
    q = p.detach().clone().requires_grad_(True)
    ours, theirs = cls([p], optim_bits=32, **kw), tcls([q], **tkw)
    for _ in range(25):
        g = torch.randn_like(p)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def _resync(opt8, opt32, p8, p32):
    """Copy the 8-bit optimizer's parameter and dequantized state into the 32-bit one."""
    st8, st32 = opt8.state[p8], opt32.state[p32]
    with torch.no_grad():
        p32.copy_(p8)
    for i in (1, 2, 3):
        if f"state{i}" not in st8:
            continue
        signed = opt8.rule_state_signed(i)
        q = opt8.qmap(p8.device, signed)
        st32[f"state{i}"].copy_(dequantize_blockwise(st8[f"state{i}"], st8[f"absmax{i}"], q, opt8.block_size))
    st32["step"] = st8["step"]


# Relative one-step error |dp8 - dp32| / |dp32| bounds (whole tensor, L2), measured with margin.
ONE_STEP_BOUND = {"Adam": 0.02, "AdamW": 0.02, "SGD": 0.01, "SGD-nesterov": 0.01, "RMSprop": 0.02,
                  "Adagrad": 0.02, "Lion": 0.05, "LAMB": 0.02, "LARS": 0.01, "RMSprop-momentum": 0.02, "AdEMAMix": 0.02}


@pytest.mark.parametrize("shape", [(1,), (255,), (257,), (33, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_8bit_one_step_error(name, dtype, shape):
    cls, kw, _, _ = CASES[name]
    torch.manual_seed(1)
    p8 = torch.randn(shape).to(dtype).requires_grad_(True)
    p32 = p8.detach().clone().requires_grad_(True)
    opt8 = cls([p8], min_8bit_size=0, **kw)
    opt32 = cls([p32], optim_bits=32, **kw)
    worst = 0.0
    for step in range(12):
        g = torch.randn(shape)
        if step > 0:
            _resync(opt8, opt32, p8, p32)
        before = p8.detach().float().clone()
        p8.grad, p32.grad = g.to(dtype), g.to(dtype)
        opt8.step()
        opt32.step()
        d8 = p8.detach().float() - before
        d32 = p32.detach().float() - before
        # bf16 parameters round each result to 8 mantissa bits: one ulp per element may differ.
        rounding = (before.abs() * 2.0**-7).norm() if dtype == torch.bfloat16 else 0.0
        if step > 0:
            worst = max(worst, float(((d8 - d32).norm() - rounding).clamp_min(0) / d32.norm().clamp_min(1e-12)))
    bound = ONE_STEP_BOUND[name]
    assert worst < bound, f"{name}: relative one-step error {worst:.4f} >= {bound}"
    assert opt8.state[p8]["state1"].dtype == torch.uint8


def _train(opt_factory, steps=200, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 1))
    gen = torch.Generator().manual_seed(123)
    teacher = torch.randn(32, 16, generator=gen) / 32**0.5, torch.randn(16, 1, generator=gen)
    opt = opt_factory(model.parameters())
    losses = []
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        y = torch.tanh(x @ teacher[0]) @ teacher[1]
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses


DRIFT_LR = {"Adam": 1e-3, "AdamW": 1e-3, "SGD": 5e-2, "SGD-nesterov": 5e-2, "RMSprop": 1e-4, "Adagrad": 1e-2,
            "Lion": 1e-4, "LAMB": 1e-3, "LARS": 1.0, "RMSprop-momentum": 1e-4, "AdEMAMix": 1e-3}


@pytest.mark.parametrize("name", list(CASES))
def test_200_step_drift_small_model(name):
    cls, kw, _, _ = CASES[name]
    kw = dict(kw, lr=DRIFT_LR[name])
    m8, l8 = _train(lambda ps: cls(ps, min_8bit_size=0, **kw))
    m32, l32 = _train(lambda ps: cls(ps, optim_bits=32, **kw))
    final8, final32 = sum(l8[-20:]) / 20, sum(l32[-20:]) / 20
    assert final32 < l32[0] * 0.8, f"{name}: 32-bit run did not learn ({l32[0]:.4f} -> {final32:.4f})"
    # Bound: 8-bit final loss within 10% (+ small absolute slack) of 32-bit after 200 steps.
    assert final8 <= final32 * 1.10 + 2e-3, f"{name}: 8-bit {final8:.5f} vs 32-bit {final32:.5f}"
    flat8 = torch.cat([p.detach().reshape(-1) for p in m8.parameters()])
    flat32 = torch.cat([p.detach().reshape(-1) for p in m32.parameters()])
    drift = float((flat8 - flat32).norm() / flat32.norm())
    assert drift < 0.1, f"{name}: parameters drifted {drift:.3f} (relative) from the 32-bit run"
