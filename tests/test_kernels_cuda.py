"""The CUDA kernels against the reference backend (run on CPU copies): bit-identical state and parameters."""
from __future__ import annotations

import pytest
import torch

from dist8.kernels.rules import Rule

from _kernel_cases import (DTYPES, MAGNITUDES, MULTI_RULES, OPTIMIZER_CASES, Case, check_all_finite_many,
                           check_extreme_gradients, check_multi_equals_single, check_optimizer_matches_cpu, check_quantize_matches_reference,
                           quantize_inputs, run_steps)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]

ALL_RULES = list(Rule)
SIZES_BLOCKS = [(1, 64), (255, 256), (257, 64), (4099, 2048), (3000, 256), (20_000, 8192)]


@pytest.fixture(scope="module", params=["block", "warp"])
def backend(request):
    """Both kernel variants: a thread block per quantization block, or a warp (DIST8_CUDA_KERNEL)."""
    from dist8.kernels import native

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIST8_CUDA_KERNEL", request.param)
        yield native.load_backend("cuda")


@pytest.mark.parametrize("bits8", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_rules_fp32(backend, rule, bits8):
    for i, (n, bs) in enumerate(SIZES_BLOCKS):
        case = Case(rule, n, bs, bits8, torch.float32, torch.float32, "cuda", seed=i)
        run_steps(backend, case, steps=50 if n > 1 else 10)


@pytest.mark.parametrize("gdtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("pdtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_rules_dtypes(backend, rule, pdtype, gdtype):
    if pdtype == gdtype == "fp32":
        pytest.skip("covered by test_rules_fp32")
    for bits8 in (True, False):
        case = Case(rule, 1000, 256, bits8, DTYPES[pdtype], DTYPES[gdtype], "cuda", seed=7)
        run_steps(backend, case, steps=20)


@pytest.mark.parametrize("rule", [Rule.SGD, Rule.LARS], ids=["SGD", "LARS"])
def test_nesterov(backend, rule):
    for bits8 in (True, False):
        case = Case(rule, 777, 64, bits8, torch.float32, torch.float32, "cuda", seed=3)
        run_steps(backend, case, steps=50, nesterov=True)


@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_magnitudes_and_zero_blocks(backend, rule):
    for mag in MAGNITUDES[rule]:
        case = Case(rule, 2000, 256, True, torch.float32, torch.float32, "cuda", seed=11, magnitude=mag)
        run_steps(backend, case, steps=10)
    case = Case(rule, 1000, 128, True, torch.float32, torch.float32, "cuda", seed=12, zero_blocks=True)
    run_steps(backend, case, steps=10)
    assert case.dut["absmax1"][0].item() == 0


@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_extreme_gradients_skip_blocks_like_the_reference(backend, rule):
    """Per-block skip of non-finite new values, counted; finite extremes never poison a block."""
    check_extreme_gradients(backend, "cuda", rules=(rule,), sizes=((300, 64), (1100, 1024), (9000, 4096)))


def test_linear_map_with_duplicate_entry(backend):
    for rule in (Rule.ADAM, Rule.SGD):
        case = Case(rule, 3000, 256, True, torch.float32, torch.float32, "cuda", seed=5, map_name="linear")
        run_steps(backend, case, steps=20)


def test_adam_large(backend):
    case = Case(Rule.ADAM, 10**6 + 3, 256, True, torch.float32, torch.float32, "cuda", seed=1)
    run_steps(backend, case, steps=3)


def test_storage_offset_views(backend):
    n, bs = 1000, 64
    case = Case(Rule.ADAM, n, bs, True, torch.float32, torch.float32, "cuda", seed=9)
    flat_p = torch.zeros(n + 37, device="cuda")
    view = flat_p[37:]
    view.copy_(case.dut["param"])
    case.dut["param"] = view
    run_steps(backend, case, steps=10)
    assert flat_p[:37].eq(0).all()


@pytest.mark.parametrize("name,x,q,bs", quantize_inputs(20_000, torch.Generator().manual_seed(0)),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_quantize_matches_reference(backend, name, x, q, bs):
    check_quantize_matches_reference(backend, name, x, q, bs, "cuda")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_finite(backend, dtype):
    x = torch.randn(100_003).to(DTYPES[dtype]).cuda()
    assert backend.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[77_777] = bad
        assert not backend.all_finite(y)


@pytest.mark.parametrize("bits8", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", MULTI_RULES, ids=lambda r: r.name)
def test_multi_tensor_op_equals_one_call_per_tensor(backend, rule, bits8):
    """fused_update_multi (one launch per 24 tensors) is bitwise the single-tensor op, per tensor."""
    check_multi_equals_single(backend, rule, bits8, "cuda")


def test_all_finite_many(backend):
    """Many tensors, one host sync: a flag per tensor."""
    check_all_finite_many(backend, "cuda")


@pytest.mark.parametrize("name", list(OPTIMIZER_CASES))
def test_optimizer_on_cuda_equals_optimizer_on_cpu(backend, name):
    """The optimizer classes end to end on CUDA (multi-tensor launches over 30 parameters of mixed
    sizes, the finite check with one NaN, GradScaler unscaling in the kernels): bitwise the CPU run."""
    check_optimizer_matches_cpu(name, "cuda")
