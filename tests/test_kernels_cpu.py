"""The CPU kernels against the reference backend: bit-identical codes, absmax and parameters."""
from __future__ import annotations

import pytest
import torch

from dist8.kernels.rules import RULE_STATES, Rule, Scalars
from dist8.quant import dynamic_map, quantize_blockwise

from _kernel_cases import (DTYPES, MAGNITUDES, MULTI_RULES, Case, check_all_finite_many, check_extreme_gradients,
                           check_multi_equals_single, check_quantize_matches_reference, quantize_inputs, run_steps)

from dist8.kernels import native


@pytest.fixture(scope="module")
def backend():
    return native.load_backend("cpu")


ALL_RULES = list(Rule)
SIZES_BLOCKS = [(1, 64), (255, 256), (257, 64), (4099, 2048), (3000, 256)]


@pytest.mark.parametrize("bits8", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_rules_fp32(backend, rule, bits8):
    for i, (n, bs) in enumerate(SIZES_BLOCKS):
        case = Case(rule, n, bs, bits8, torch.float32, torch.float32, "cpu", seed=i)
        run_steps(backend, case, steps=50 if n > 1 else 10)


MIXED_DTYPES = [(p, g) for p in DTYPES for g in DTYPES if (p, g) != ("fp32", "fp32")]  # fp32/fp32: test_rules_fp32


@pytest.mark.parametrize("pdtype,gdtype", MIXED_DTYPES, ids=[f"{p}-{g}" for p, g in MIXED_DTYPES])
@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_rules_dtypes(backend, rule, pdtype, gdtype):
    for bits8 in (True, False):
        case = Case(rule, 1000, 256, bits8, DTYPES[pdtype], DTYPES[gdtype], "cpu", seed=7)
        run_steps(backend, case, steps=20)


@pytest.mark.parametrize("rule", [Rule.SGD, Rule.LARS], ids=["SGD", "LARS"])
def test_nesterov(backend, rule):
    for bits8 in (True, False):
        case = Case(rule, 777, 64, bits8, torch.float32, torch.float32, "cpu", seed=3)
        run_steps(backend, case, steps=50, nesterov=True)


@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_magnitudes_and_zero_blocks(backend, rule):
    for mag in MAGNITUDES[rule]:
        case = Case(rule, 2000, 256, True, torch.float32, torch.float32, "cpu", seed=11, magnitude=mag)
        run_steps(backend, case, steps=10)
    case = Case(rule, 1000, 128, True, torch.float32, torch.float32, "cpu", seed=12, zero_blocks=True)
    run_steps(backend, case, steps=10)
    absmax = case.dut["absmax1"]
    assert absmax[0] == 0, "first block should stay all-zero"


def test_extreme_gradients_skip_blocks_like_the_reference(backend):
    """inf/NaN at block edges and in the last partial block, 3e38, 1e19, subnormals, mixed:
    blocks with a non-finite new state or output are skipped, counted, and nothing goes non-finite."""
    check_extreme_gradients(backend, "cpu")


def test_linear_map_with_duplicate_entry(backend):
    # the signed linear map repeats 1.0: exercises ties and duplicate codes
    for rule in (Rule.ADAM, Rule.SGD):
        case = Case(rule, 3000, 256, True, torch.float32, torch.float32, "cpu", seed=5, map_name="linear")
        run_steps(backend, case, steps=20)


def test_adam_large(backend):
    case = Case(Rule.ADAM, 10**6 + 3, 256, True, torch.float32, torch.float32, "cpu", seed=1)
    run_steps(backend, case, steps=3)


def test_adam_bf16_large_block(backend):
    case = Case(Rule.ADAM, 70_001, 2048, True, torch.bfloat16, torch.bfloat16, "cpu", seed=2)
    run_steps(backend, case, steps=5)


def test_storage_offset_views(backend):
    """Params/states that are contiguous 1-D views at an offset into larger flat buffers."""
    n, bs = 1000, 64
    ref_case = Case(Rule.ADAM, n, bs, True, torch.float32, torch.float32, "cpu", seed=9)
    flat_p = torch.zeros(n + 37)
    flat_s1 = torch.zeros(n + 5, dtype=torch.uint8)
    flat_s2 = torch.zeros(n + 11, dtype=torch.uint8)
    flat_a = torch.zeros(ref_case.dut["absmax1"].numel() * 2 + 3)
    nb = ref_case.dut["absmax1"].numel()
    views = {
        "param": flat_p[37:], "state1": flat_s1[5:], "state2": flat_s2[11:],
        "absmax1": flat_a[3 : 3 + nb], "absmax2": flat_a[3 + nb :],
    }
    for k, v in views.items():
        v.copy_(ref_case.dut[k])
        ref_case.dut[k] = v
    run_steps(backend, ref_case, steps=10)
    assert flat_p[:37].eq(0).all() and flat_s1[:5].eq(0).all() and flat_a[:3].eq(0).all()


def test_validation_errors(backend):
    q = dynamic_map(True)
    qu = dynamic_map(False)
    n, bs = 512, 256
    p = torch.zeros(n)
    g = torch.zeros(n)
    s1 = torch.zeros(n, dtype=torch.uint8)
    s2 = torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(2), torch.zeros(2)
    c = Scalars(lr=1e-3, beta1=0.9, one_minus_beta1=0.1, beta2=0.999, one_minus_beta2=0.001, eps=1e-8)
    backend.fused_update(Rule.ADAM, p, g, s1, s2, a1, a2, q, qu, c, 0, bs)
    with pytest.raises(ValueError, match="param"):
        backend.fused_update(Rule.ADAM, torch.zeros(n, 2)[:, 0], g, s1, s2, a1, a2, q, qu, c, 0, bs)
    with pytest.raises(ValueError, match="grad"):
        backend.fused_update(Rule.ADAM, p, torch.zeros(n + 1), s1, s2, a1, a2, q, qu, c, 0, bs)
    with pytest.raises(ValueError, match="state2"):
        backend.fused_update(Rule.ADAM, p, g, s1, torch.zeros(2 * n, dtype=torch.uint8)[::2], a1, a2, q, qu, c, 0, bs)
    with pytest.raises(ValueError, match="absmax1"):
        backend.fused_update(Rule.ADAM, p, g, s1, s2, torch.zeros(3), a2, q, qu, c, 0, bs)
    with pytest.raises(ValueError, match="block_size"):
        backend.fused_update(Rule.ADAM, p, g, s1, s2, a1, a2, q, qu, c, 0, 100)
    with pytest.raises(ValueError, match="state1"):
        backend.fused_update(Rule.SGD, p, g, torch.zeros(n, dtype=torch.float64), None, None, None, None, None, c, 0, bs)


@pytest.mark.parametrize("name,x,q,bs", quantize_inputs(20_000, torch.Generator().manual_seed(0)),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_quantize_matches_reference(backend, name, x, q, bs):
    check_quantize_matches_reference(backend, name, x, q, bs, "cpu")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("n,bs", [(1, 64), (255, 64), (257, 256), (10_001, 2048)])
def test_quantize_dtypes_sizes(backend, dtype, n, bs):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(DTYPES[dtype])
    for q in (dynamic_map(True), dynamic_map(False)):
        codes, absmax = backend.quantize_blockwise(x, q, bs)
        rc, ra = quantize_blockwise(x, q, bs)
        assert torch.equal(codes, rc) and torch.equal(absmax, ra)


def test_quantize_nan_inf(backend):
    q = dynamic_map(True)
    x = torch.randn(1024)
    x[3] = float("nan")
    x[300] = float("inf")
    x[700] = float("-inf")
    codes, absmax = backend.quantize_blockwise(x, q, 256)
    rc, ra = quantize_blockwise(x, q, 256)
    torch.testing.assert_close(absmax, ra, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(codes, rc)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_finite(backend, dtype):
    x = torch.randn(100_003).to(DTYPES[dtype])
    assert backend.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77_777] = bad
        assert not backend.all_finite(y)
    assert backend.all_finite(torch.empty(0, dtype=DTYPES[dtype]))


def test_ops_registered(backend):
    assert hasattr(torch.ops.dist8, "fused_update_")
    assert backend.name == "cpu"
    assert RULE_STATES  # the spec is importable alongside the ops


def test_scalars_tuple_is_the_field_order():
    """The kernels read Scalars positionally: as_tuple must list every field, in declaration order."""
    from dataclasses import astuple, fields

    s = Scalars(*[float(i) for i in range(len(fields(Scalars)))])
    assert s.as_tuple() == astuple(s) and len(s.as_tuple()) == 12


def test_info_names_the_cpu_code_path(backend):
    """`dist8 info` says which CPU code path the build uses (AVX-512 with or without VBMI, AVX2, portable)."""
    from dist8.kernels.registry import backend_report

    why = backend_report()["cpu"]["why"]
    assert "native kernels built and loaded" in why
    assert any(path in why for path in ("avx512", "avx2", "portable")), why


@pytest.mark.parametrize("bits8", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", MULTI_RULES, ids=lambda r: r.name)
def test_multi_tensor_op_equals_one_call_per_tensor(backend, rule, bits8):
    """fused_update_multi (one kernel call for many tensors) is bitwise the single-tensor op, per tensor."""
    check_multi_equals_single(backend, rule, bits8, "cpu")


def test_all_finite_many(backend):
    """One pass over many tensors: flags per tensor, any dtype, empty tensors, inf/NaN anywhere."""
    check_all_finite_many(backend, "cpu")


def test_ops_trace_under_torch_compile(backend):
    """Fake kernels: torch.compile(fullgraph=True) traces quantize/dequantize and the in-place update."""
    from _kernel_cases import scalars_for

    from dist8.kernels.native import _scalar_values
    from dist8.quant import dynamic_map

    q1, q2 = dynamic_map(True), dynamic_map(False)
    values = _scalar_values(scalars_for(Rule.ADAM, 0, torch.Generator().manual_seed(0)))
    empty = torch.empty(0)

    def step(p, g, s1, s2, a1, a2):
        torch.ops.dist8.fused_update_(int(Rule.ADAM), p, g, s1, s2, a1, a2, q1, q2, values, 0, 256, empty, empty.long(),
                                      empty.to(torch.int8))  # no master-weight correction
        c, a = torch.ops.dist8.quantize_blockwise(p, q1, 256)
        return torch.ops.dist8.dequantize_blockwise(c, a, q1, 256) * 2

    case = Case(Rule.ADAM, 1000, 256, True, torch.float32, torch.float32, "cpu", seed=4)
    d = case.dut
    args = [d["param"], case.grad(0), d["state1"], d["state2"], d["absmax1"], d["absmax2"]]
    twin = [t.clone() for t in args]
    compiled = torch.compile(step, fullgraph=True)
    out = compiled(*args)
    assert torch.equal(out, step(*twin))
    for a, b in zip(args, twin):
        assert torch.equal(a, b)  # the compiled graph did the in-place updates too
