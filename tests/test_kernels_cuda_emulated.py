"""The CUDA kernels' logic without a GPU: csrc/cuda/dist8_cuda.cu compiled as C++ with every
CUDA thread a fiber (tests/cuda_emu), held to the reference like the real CUDA test module.

What this covers: indexing, partial and multi-thread-per-value blocks, the shared-memory and
global-scratch paths, the block reductions, the multi-tensor launches' chunking and tensor
lookup, the finite checks' striding. What it cannot: nvcc's code generation (the device
arithmetic intrinsics, FMA contraction), memory ordering on real hardware, performance --
tests/test_kernels_cuda.py on a GPU machine does those.
"""
from __future__ import annotations

import pytest
import torch

from dist8.kernels.rules import Rule

from _cuda_emulation import emulated_cuda_backend
from _kernel_cases import (DTYPES, MAGNITUDES, MULTI_RULES, OPTIMIZER_CASES, Case, assert_same_runs,
                           check_all_finite_many, check_extreme_gradients, check_multi_equals_single,
                           check_quantize_matches_reference, optimizer_run, quantize_inputs, run_steps)

ALL_RULES = list(Rule)
# Small: every CUDA thread is a fiber. 64-value blocks take 64 threads, 256 and above 256;
# 8192 takes the global-scratch path; sizes end in partial blocks.
SIZES_BLOCKS = [(1, 64), (255, 256), (257, 64), (1500, 1024), (9000, 8192)]


@pytest.fixture(scope="module", params=["block", "warp"])
def backend(request):
    """Both kernel variants: a thread block per quantization block, or a warp (DIST8_CUDA_KERNEL)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIST8_CUDA_KERNEL", request.param)
        yield emulated_cuda_backend()


@pytest.mark.parametrize("bits8", [True, False], ids=["8bit", "32bit"])
@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_rules_fp32(backend, rule, bits8):
    for i, (n, bs) in enumerate(SIZES_BLOCKS):
        run_steps(backend, Case(rule, n, bs, bits8, torch.float32, torch.float32, "cpu", seed=i), steps=3)


@pytest.mark.parametrize("rule", ALL_RULES, ids=[r.name for r in ALL_RULES])
def test_extreme_gradients_skip_blocks_like_the_reference(backend, rule):
    """Per-block skip of non-finite new values, counted; finite extremes never poison a block."""
    check_extreme_gradients(backend, "cpu", rules=(rule,), sizes=((300, 64), (1100, 1024)))


@pytest.mark.parametrize("rule", [Rule.ADAM, Rule.LION, Rule.ADEMAMIX], ids=["ADAM", "LION", "ADEMAMIX"])
def test_rules_dtypes(backend, rule):
    for pd, gd in [("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "bf16"), ("fp16", "fp16")]:
        case = Case(rule, 300, 64, True, DTYPES[pd], DTYPES[gd], "cpu", seed=7)
        run_steps(backend, case, steps=3)


@pytest.mark.parametrize("rule", [Rule.SGD, Rule.LARS], ids=["SGD", "LARS"])
def test_nesterov(backend, rule):
    run_steps(backend, Case(rule, 300, 64, True, torch.float32, torch.float32, "cpu", seed=3), steps=3, nesterov=True)


@pytest.mark.parametrize("rule", [Rule.ADAM, Rule.SGD], ids=["ADAM", "SGD"])
def test_magnitudes_and_zero_blocks(backend, rule):
    for mag in MAGNITUDES[rule]:
        run_steps(backend, Case(rule, 300, 64, True, torch.float32, torch.float32, "cpu", seed=11, magnitude=mag),
                  steps=2)
    case = Case(rule, 300, 64, True, torch.float32, torch.float32, "cpu", seed=12, zero_blocks=True)
    run_steps(backend, case, steps=2)
    assert case.dut["absmax1"][0].item() == 0


def test_storage_offset_views(backend):
    case = Case(Rule.ADAM, 300, 64, True, torch.float32, torch.float32, "cpu", seed=9)
    flat = torch.zeros(337)
    flat[37:].copy_(case.dut["param"])
    case.dut["param"] = flat[37:]
    run_steps(backend, case, steps=2)
    assert flat[:37].eq(0).all()


@pytest.mark.parametrize("name,x,q,bs", quantize_inputs(3000, torch.Generator().manual_seed(0)),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_quantize_matches_reference(backend, name, x, q, bs):
    check_quantize_matches_reference(backend, name, x, q, bs, "cpu")


@pytest.mark.parametrize("rule", MULTI_RULES, ids=lambda r: r.name)
def test_multi_tensor_op_equals_one_call_per_tensor(backend, rule):
    """Chunks of 24 tensors per launch, thread blocks finding their tensor: bitwise the single op."""
    check_multi_equals_single(backend, rule, True, "cpu")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_dtypes_and_nonfinite(backend, dtype):
    from dist8.quant import dynamic_map, quantize_blockwise

    x = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3).to(DTYPES[dtype])
    x[3], x[100], x[200] = float("nan"), float("inf"), float("-inf")
    for q in (dynamic_map(True), dynamic_map(False)):
        for bs in (64, 256):
            codes, absmax = backend.quantize_blockwise(x, q, bs)
            rc, ra = quantize_blockwise(x, q, bs)
            torch.testing.assert_close(absmax, ra, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(codes, rc), (dtype, bs)


def test_all_finite(backend):
    x = torch.randn(5003)
    assert backend.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[4321] = bad
        assert not backend.all_finite(y)


def test_all_finite_many(backend):
    check_all_finite_many(backend, "cpu")


@pytest.mark.parametrize("name", list(OPTIMIZER_CASES))
def test_optimizer_through_emulated_cuda_kernels_equals_cpu_kernels(backend, name, monkeypatch):
    """The optimizer classes end to end with every kernel call going to the CUDA code (multi-tensor
    launches, finite checks, LAMB/LARS update_out, GradScaler): bitwise the CPU kernels' run."""
    import dist8.optim.pipeline as pipeline  # where the step asks for its backend

    cpu_backend = pipeline.get_backend(torch.device("cpu"))
    calls = []

    def emulated_on_first_run(device):
        calls.append(device)
        return backend

    monkeypatch.setattr(pipeline, "get_backend", emulated_on_first_run)
    got, opt = optimizer_run(name, "cpu")
    assert calls, "the optimizer never asked for a backend"
    monkeypatch.setattr(pipeline, "get_backend", lambda device: cpu_backend)
    assert_same_runs(name, got, opt, *optimizer_run(name, "cpu"))
