"""Master weights in the fused kernels: reference == CPU == emulated CUDA (block and warp kernels), bitwise
(backends: the ``backend`` fixture of tests/conftest.py; the real CUDA kernels where a GPU is present).

Each case holds a bf16/fp16 parameter with an int8 (24-bit) or int16 (32-bit) correction
and 8-bit states, and steps it 50 times on every backend from identical inputs: sizes end
in a partial block, and at two steps one block gets inf/NaN gradients (skipped: parameter,
correction and states unchanged, counted). LAMB writes its direction from the decoded
master and leaves parameter and correction alone (phase 2 is the optimizer's). The
multi-tensor op mixes tensors with and without a correction. The reference backend is
dist8.quant.master's encode/decode around apply_rule; the kernels use dist8_rules.h.
"""
from __future__ import annotations

import pytest
import torch

from dist8.kernels.native import load_backend
from dist8.kernels.reference import ReferenceBackend
from dist8.kernels.rules import RULE_STATES, RULE_WRITES_UPDATE, Rule, Scalars
from dist8.quant import quantize_blockwise
from dist8.quant.master import decode_master, encode_master

from kernel_cases import flags_for, per_backend, qmaps, scalars_for

REFERENCE = ReferenceBackend()
RULES = [Rule.ADAM, Rule.SGD, Rule.LION, Rule.RMSPROP, Rule.LAMB]
FORMATS = [(torch.bfloat16, 24), (torch.float16, 24), (torch.bfloat16, 32), (torch.float16, 32)]
BLOCK = 64
N = 300  # 4 full blocks and a partial one
BAD_BLOCK = 2  # gets inf/NaN gradients at SKIP_STEPS
SKIP_STEPS = (7, 31)


def make_tensors(rule, dtype, bits, gen):
    master = torch.randn(N, generator=gen) * 0.1
    master[5] = 0.0
    master[6] = -0.0
    master[7] = 1e-6  # below fp16's normal range
    p, c = encode_master(master, dtype, bits)
    t = {"param": p, "correction": c, "skipped": torch.zeros(1, dtype=torch.int64)}
    maps = qmaps(RULE_STATES[rule], "dynamic")
    for i, signed in enumerate(RULE_STATES[rule], start=1):
        s = torch.randn(N, generator=gen) * 1e-3
        t[f"state{i}"], t[f"absmax{i}"] = quantize_blockwise(s if signed else s * s, maps[i - 1], BLOCK)
    if rule in RULE_WRITES_UPDATE:
        t["update_out"] = torch.zeros(N)
    return t, maps


def call(backend, rule, t, maps, g, scalars, flags):
    two = len(maps) > 1
    backend.fused_update(rule, t["param"], g, t["state1"], t.get("state2"), t["absmax1"], t.get("absmax2"),
                         maps[0], maps[1] if two else None, scalars, flags, BLOCK, t.get("update_out"), t["skipped"],
                         correction=t["correction"])


def grad_at(step, gen):
    g = torch.randn(N, generator=gen)
    if step in SKIP_STEPS:
        g[BAD_BLOCK * BLOCK + 3] = float("inf") if step == SKIP_STEPS[0] else float("nan")
    return g


def assert_same(ref, dut, where):
    for key, r in ref.items():
        d = dut[key].cpu()
        assert d.dtype == r.dtype and torch.equal(d.view(torch.uint8) if d.is_floating_point() else d,
                                                  r.view(torch.uint8) if r.is_floating_point() else r), \
            f"{where}: {key} differs"


def on(device, tensors):
    """Copies of a dict (or list) of tensors on ``device`` (None stays None)."""
    move = lambda v: None if v is None else v.clone().to(device)  # noqa: E731
    return {k: move(v) for k, v in tensors.items()} if isinstance(tensors, dict) else [move(v) for v in tensors]


ALL_KINDS = dict(cpu=[()], emulated=[()], cuda=[()])


@per_backend("", **ALL_KINDS)
@pytest.mark.parametrize("dtype,bits", FORMATS, ids=[f"{str(d)[6:]}-{b}" for d, b in FORMATS])
@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_fifty_steps_bitwise(backend, device, rule, dtype, bits):
    gen = torch.Generator().manual_seed(int(rule) * 10 + bits)
    ref, maps = make_tensors(rule, dtype, bits, gen)
    dut, dut_maps = on(device, ref), on(device, maps)
    bad = slice(BAD_BLOCK * BLOCK, (BAD_BLOCK + 1) * BLOCK)
    for step in range(50):
        g = grad_at(step, gen).to(dtype)
        scalars, flags = scalars_for(rule, step, gen), flags_for(rule, step, False)
        before = (ref["param"][bad].clone(), ref["correction"][bad].clone())
        call(REFERENCE, rule, ref, maps, g, scalars, flags)
        call(backend, rule, dut, dut_maps, g.clone().to(device), scalars, flags)
        assert_same(ref, dut, f"{backend.name} step {step}")
        if step in SKIP_STEPS:  # the skipped block kept its parameter and correction
            assert torch.equal(ref["param"][bad], before[0]) and torch.equal(ref["correction"][bad], before[1])
    assert ref["skipped"].item() == len(SKIP_STEPS)
    if rule in RULE_WRITES_UPDATE:  # the direction only: parameter and correction untouched
        fresh, _ = make_tensors(rule, dtype, bits, torch.Generator().manual_seed(int(rule) * 10 + bits))
        assert torch.equal(ref["param"], fresh["param"]) and torch.equal(ref["correction"], fresh["correction"])
    else:
        assert ref["correction"].ne(0).any()


@per_backend("", **ALL_KINDS)
def test_multi_tensor_op_mixes_corrections(backend, device):
    """One multi-tensor call: bf16+int8, fp16+int16 and an fp32 tensor without; == one call each on the reference."""
    gen = torch.Generator().manual_seed(5)
    rule = Rule.ADAM
    tensors, maps = [], None
    for dtype, bits in [(torch.bfloat16, 24), (torch.float16, 32), (torch.float32, None)]:
        if bits is None:
            t, maps = make_tensors(rule, torch.bfloat16, 24, gen)
            t["param"], t["correction"] = t["param"].float(), None
        else:
            t, maps = make_tensors(rule, dtype, bits, gen)
        tensors.append(t)
    duts = [on(device, t) for t in tensors]
    dut_maps = on(device, maps)
    for step in range(5):
        scalars, flags = scalars_for(rule, step, gen), 0
        grads = [grad_at(step, gen).to(t["param"].dtype) for t in tensors]
        for t, g in zip(tensors, grads):
            call(REFERENCE, rule, t, maps, g, scalars, flags)
        rows = [(d["param"], g.to(device), d["state1"], d["state2"], d["absmax1"], d["absmax2"])
                for d, g in zip(duts, grads)]
        skipped = torch.zeros(len(rows), dtype=torch.int64, device=device)
        backend.fused_update_multi(rule, rows, dut_maps[0], dut_maps[1], scalars, flags, BLOCK, skipped,
                                   corrections=[d["correction"] for d in duts])
    for t, d in zip(tensors, duts):
        assert_same({k: v for k, v in t.items() if v is not None and k != "skipped"},
                    {k: v for k, v in d.items() if v is not None}, backend.name)


@per_backend("", **ALL_KINDS)
def test_kernel_argument_checks(backend, device):
    gen = torch.Generator().manual_seed(6)
    t, maps = make_tensors(Rule.SGD, torch.bfloat16, 24, gen)
    t, maps = on(device, t), on(device, maps)
    g = torch.randn(N, device=device)
    scalars = scalars_for(Rule.SGD, 0, gen)
    for bad, match in [(torch.zeros(N, dtype=torch.int32, device=device), "int8"),
                       (torch.zeros(N - 1, dtype=torch.int8, device=device), "elements")]:
        with pytest.raises(ValueError, match=match):
            backend.fused_update(Rule.SGD, t["param"], g, t["state1"], None, t["absmax1"], None, maps[0], None,
                                 scalars, 1, BLOCK, correction=bad)
    with pytest.raises(ValueError, match="bfloat16/float16 param"):
        backend.fused_update(Rule.SGD, t["param"].float(), g, t["state1"], None, t["absmax1"], None, maps[0], None,
                             scalars, 1, BLOCK, correction=t["correction"])
    # the op itself refuses too (TORCH_CHECK), for callers that skip the Python checks
    with pytest.raises(RuntimeError, match="bfloat16/float16 param"):
        none = torch.empty(0, device=device)
        backend.ops.fused_update_(int(Rule.SGD), t["param"].float(), g, t["state1"], none, t["absmax1"],
                                   none, maps[0], none, list(scalars.as_tuple()), 1, BLOCK,
                                   none, torch.empty(0, dtype=torch.int64, device=device), none, none,
                                   t["correction"])


def test_decode_matches_spec_for_every_parameter_value():
    """The kernels' decode of every bf16/fp16 value with extreme corrections equals master.py's (one step,
    lr 0: the rule returns p, the kernel re-encodes decode(p, c))."""
    cpu = load_backend("cpu")
    for dtype, bits in FORMATS:
        p = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
        p = p[torch.isfinite(p)]
        q = 128 if bits == 24 else 32768
        cdt = torch.int8 if bits == 24 else torch.int16
        for cval in (1, -1, q - 1, -q):
            c = torch.full(p.shape, cval, dtype=cdt)
            states = (torch.zeros(p.numel()),)
            outs = []
            for be in (REFERENCE, cpu):
                pp, cc, s = p.clone(), c.clone(), states[0].clone()
                be.fused_update(Rule.SGD, pp, torch.zeros(p.numel()), s, None, None, None, None, None,
                                Scalars(lr=0.0),
                                1, 256, correction=cc)
                outs.append((pp, cc))
            assert torch.equal(outs[0][0].view(torch.int16), outs[1][0].view(torch.int16)), (dtype, bits, cval)
            assert torch.equal(outs[0][1], outs[1][1]), (dtype, bits, cval)
            m = decode_master(p, c)
            assert torch.equal(decode_master(*outs[1]), decode_master(*encode_master(m, dtype, bits)))


@per_backend("dtype_name,bits", all=[(str(d)[6:], b) for d, b in FORMATS])
def test_encode_of_every_value_class_matches_the_spec(backend, device, dtype_name, bits):
    """The kernels' encode of arbitrary fp32 masters (the value classes of test_master_weights: ties,
    near-ties, fp32 subnormals, random bit patterns, near overflow, saturation) == master.py's. An SGD
    step with lr = -1 from p = 0 writes the gradient itself as the new master value."""
    from test_master_weights import value_classes

    dtype = getattr(torch, dtype_name)
    m = torch.cat(list(value_classes(dtype, torch.Generator().manual_seed(8)).values()))
    m = torch.where(m == 0, torch.zeros_like(m), m)  # 0 - (-1 * -0.0) is +0.0: -0.0 cannot be injected this way
    if backend.name not in ("cpu", "cuda"):  # emulated CUDA: every thread is a fiber
        m = m[torch.randperm(m.numel(), generator=torch.Generator().manual_seed(9))[:20000]]
    p = torch.zeros(m.numel(), dtype=dtype, device=device)
    c = torch.zeros(m.numel(), dtype=torch.int8 if bits == 24 else torch.int16, device=device)
    state = torch.zeros(m.numel(), device=device)
    backend.fused_update(Rule.SGD, p, m.to(device), state, None, None, None, None, None, Scalars(lr=-1.0), 1, 256,
                         correction=c)
    p, c = p.cpu(), c.cpu()
    want_p, want_c = encode_master(m, dtype, bits)
    assert torch.equal(p.view(torch.int16), want_p.view(torch.int16)) and torch.equal(c, want_c)
