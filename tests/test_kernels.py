"""Every kernel backend held to the reference backend (dist8.kernels.reference), bit for bit.

Backends (``backend_id``; the ``backend`` fixture of tests/conftest.py loads it, ``device`` is where
its tensors live; kernel_cases.per_backend parametrizes a test over them):

    cpu              the C++ kernels (csrc/cpu), built for this machine
    cuda-block       the CUDA kernels, a thread block per quantization block   } need a CUDA device:
    cuda-warp        the CUDA kernels, a warp per block (DIST8_CUDA_KERNEL)     } skipped, saying so, without
    emulated-block   csrc/cuda compiled as C++, every CUDA thread a fiber (tests/cuda_emu), on CPU tensors
    emulated-warp    the same, warp variant

The emulation covers the CUDA kernels' logic (indexing, partial and multi-thread-per-value blocks,
the shared-memory and global-scratch paths, the block reductions, the multi-tensor launches'
chunking and tensor lookup, the finite checks' striding); not nvcc's code generation (FMA
contraction, the arithmetic intrinsics), memory ordering on real hardware or speed: the cuda-*
backends do those on a GPU machine. Every CUDA thread is a fiber there, so emulated cases are
smaller (the sizes below are per kind: "cpu", "cuda", "emulated").

How to add:
* a rule: a branch in kernel_cases.scalars_for (MAGNITUDES if it squares the gradient); every
  test below iterates over ``Rule``;
* a case for all backends: a test with ``@per_backend("arg1,arg2", all=[rows])``, taking
  ``backend`` (and ``device``/``kind`` as needed); ``cpu=[...]``, ``cuda=[...]``,
  ``emulated=[...]`` give a kind other rows (or none: a kind not named runs nothing);
* a backend-specific case: the same decorator naming only that kind.
tests/test_kernels_cpu_builds.py reruns the ``cpu`` cases of this module against other CPU builds.
"""
from __future__ import annotations

from itertools import product

import pytest
import torch

from dist8.kernels.reference import ReferenceBackend
from dist8.kernels.rules import RULE_STATES, Rule, Scalars
from dist8.quant import dynamic_map, quantize_blockwise

from kernel_cases import (DTYPES, MAGNITUDES, MULTI_RULES, OPTIMIZER_CASES, Case, assert_same_runs,
                          check_all_finite_many, check_extreme_gradients, check_multi_equals_single,
                          check_optimizer_matches_cpu, check_quantize_matches_reference, optimizer_run, per_backend,
                          quantize_inputs, run_steps, scalars_for)

ALL_RULES = list(Rule)
BITS = (True, False)
MIXED_DTYPES = [(p, g) for p in DTYPES for g in DTYPES if (p, g) != ("fp32", "fp32")]  # fp32/fp32: test_rules_fp32

# ---- the rules -------------------------------------------------------------------------------
# (n, block size) of test_rules_fp32, ending in partial blocks; 8192 takes CUDA's global-scratch path.
RULE_SIZES = {
    "cpu": [(1, 64), (255, 256), (257, 64), (4099, 2048), (3000, 256)],
    "cuda": [(1, 64), (255, 256), (257, 64), (4099, 2048), (3000, 256), (20_000, 8192)],
    "emulated": [(1, 64), (255, 256), (257, 64), (1500, 1024), (9000, 8192)],
}


@per_backend("rule,bits8", all=list(product(ALL_RULES, BITS)))
def test_rules_fp32(backend, kind, device, rule, bits8):
    for i, (n, bs) in enumerate(RULE_SIZES[kind]):
        case = Case(rule, n, bs, bits8, torch.float32, torch.float32, device, seed=i)
        run_steps(backend, case, steps=3 if kind == "emulated" else 50 if n > 1 else 10)


@per_backend("rule,pdtype,gdtype", all=[(r, p, g) for r in ALL_RULES for p, g in MIXED_DTYPES],
             emulated=[(r, p, g) for r in (Rule.ADAM, Rule.LION, Rule.ADEMAMIX)
                       for p, g in [("bf16", "bf16"), ("fp16", "fp32"), ("fp32", "bf16"), ("fp16", "fp16")]])
def test_rules_dtypes(backend, kind, device, rule, pdtype, gdtype):
    if kind == "emulated":
        run_steps(backend, Case(rule, 300, 64, True, DTYPES[pdtype], DTYPES[gdtype], device, seed=7), steps=3)
        return
    for bits8 in BITS:
        case = Case(rule, 1000, 256, bits8, DTYPES[pdtype], DTYPES[gdtype], device, seed=7)
        run_steps(backend, case, steps=20)


@per_backend("rule", all=[Rule.SGD, Rule.LARS])
def test_nesterov(backend, kind, device, rule):
    if kind == "emulated":
        run_steps(backend, Case(rule, 300, 64, True, torch.float32, torch.float32, device, seed=3), steps=3,
                  nesterov=True)
        return
    for bits8 in BITS:
        case = Case(rule, 777, 64, bits8, torch.float32, torch.float32, device, seed=3)
        run_steps(backend, case, steps=50, nesterov=True)


# (n, block size, steps) of the magnitude cases and of the all-zero-block case
MAGNITUDE_CASES = {"cpu": ((2000, 256, 10), (1000, 128, 10)), "cuda": ((2000, 256, 10), (1000, 128, 10)),
                   "emulated": ((300, 64, 2), (300, 64, 2))}


@per_backend("rule", all=ALL_RULES, emulated=[Rule.ADAM, Rule.SGD])
def test_magnitudes_and_zero_blocks(backend, kind, device, rule):
    (n, bs, steps), (zn, zbs, zsteps) = MAGNITUDE_CASES[kind]
    for mag in MAGNITUDES[rule]:
        run_steps(backend, Case(rule, n, bs, True, torch.float32, torch.float32, device, seed=11, magnitude=mag),
                  steps=steps)
    case = Case(rule, zn, zbs, True, torch.float32, torch.float32, device, seed=12, zero_blocks=True)
    run_steps(backend, case, steps=zsteps)
    assert case.dut["absmax1"][0].item() == 0, "first block should stay all-zero"


EXTREME_SIZES = {"cpu": ((300, 64), (1000, 256)), "cuda": ((300, 64), (1100, 1024), (9000, 4096)),
                 "emulated": ((300, 64), (1100, 1024))}


@per_backend("rule", all=ALL_RULES)
def test_extreme_gradients_skip_blocks_like_the_reference(backend, kind, device, rule):
    """inf/NaN at block edges and in the last partial block, 3e38, 1e19, subnormals, mixed:
    blocks with a non-finite new state or output are skipped, counted, and nothing goes non-finite."""
    check_extreme_gradients(backend, device, rules=(rule,), sizes=EXTREME_SIZES[kind])


@per_backend("", cpu=[()], cuda=[()])
def test_linear_map_with_duplicate_entry(backend, device):
    # the signed linear map repeats 1.0: exercises ties and duplicate codes
    for rule in (Rule.ADAM, Rule.SGD):
        case = Case(rule, 3000, 256, True, torch.float32, torch.float32, device, seed=5, map_name="linear")
        run_steps(backend, case, steps=20)


@per_backend("rule", all=ALL_RULES, emulated=[Rule.ADAM, Rule.RMSPROP, Rule.LION])
def test_fp8_map(backend, kind, device, rule):
    """quant_map="fp8": the AVX2 and AVX-512 CPU kernels compute codes and values from the float
    bits (checked below), every other backend looks them up; all equal the reference bit for bit,
    also in a partial last block, with bf16 parameters and for tiny/huge state magnitudes."""
    if kind == "cpu":
        from dist8.quant import fp8_map

        computed = torch.ops.dist8_cpu_info.features().startswith(("avx2", "avx512"))
        for signed in (True, False):
            assert torch.ops.dist8_cpu_info.map_codes(fp8_map(signed)) == ("fp8 codec" if computed else "key table")
    sizes = [(300, 64, torch.float32)] if kind == "emulated" else [(3000, 256, torch.float32), (1000, 64, torch.bfloat16)]
    for i, (n, bs, pdtype) in enumerate(sizes):
        run_steps(backend, Case(rule, n, bs, True, pdtype, pdtype, device, seed=20 + i, map_name="fp8"),
                  steps=3 if kind == "emulated" else 20)
    if kind != "emulated":
        for mag in (1e-30, 1e-6, 1e6):
            run_steps(backend, Case(rule, 1000, 256, True, torch.float32, torch.float32, device, seed=30,
                                    magnitude=mag, map_name="fp8"), steps=5)


@per_backend("", cpu=[()], cuda=[()])
def test_adam_large(backend, device):
    run_steps(backend, Case(Rule.ADAM, 10**6 + 3, 256, True, torch.float32, torch.float32, device, seed=1), steps=3)


@per_backend("", cpu=[()])
def test_adam_bf16_large_block(backend, device):
    run_steps(backend, Case(Rule.ADAM, 70_001, 2048, True, torch.bfloat16, torch.bfloat16, device, seed=2), steps=5)


@per_backend("n,steps", all=[(1000, 10)], emulated=[(300, 2)])
def test_storage_offset_views(backend, device, n, steps):
    """Params/states that are contiguous 1-D views at an offset into larger flat buffers."""
    case = Case(Rule.ADAM, n, 64, True, torch.float32, torch.float32, device, seed=9)
    nb = case.dut["absmax1"].numel()
    flat_p = torch.zeros(n + 37, device=device)
    flat_s1 = torch.zeros(n + 5, dtype=torch.uint8, device=device)
    flat_s2 = torch.zeros(n + 11, dtype=torch.uint8, device=device)
    flat_a = torch.zeros(nb * 2 + 3, device=device)
    views = {"param": flat_p[37:], "state1": flat_s1[5:], "state2": flat_s2[11:],
             "absmax1": flat_a[3:3 + nb], "absmax2": flat_a[3 + nb:]}
    for k, v in views.items():
        v.copy_(case.dut[k])
        case.dut[k] = v
    run_steps(backend, case, steps=steps)
    assert flat_p[:37].eq(0).all() and flat_s1[:5].eq(0).all() and flat_a[:3].eq(0).all()


@per_backend("", cpu=[()])
def test_validation_errors(backend):
    q = dynamic_map(True)
    qu = dynamic_map(False)
    n, bs = 512, 256
    p = torch.zeros(n)
    g = torch.zeros(n)
    s1 = torch.zeros(n, dtype=torch.uint8)
    s2 = torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(2), torch.zeros(2)
    c = Scalars.for_adam(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8)
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
    with pytest.raises(ValueError, match="update"):
        backend.trust_step(p, torch.zeros(n, dtype=torch.bfloat16), 0.1)
    with pytest.raises(ValueError, match="param"):
        backend.trust_step(torch.zeros(n, 2)[:, 0], torch.zeros(n), 0.1)


@per_backend("bits8", cpu=BITS, cuda=BITS, emulated=[True])
@pytest.mark.parametrize("rule", MULTI_RULES, ids=lambda r: r.name)
def test_multi_tensor_op_equals_one_call_per_tensor(backend, device, rule, bits8):
    """fused_update_multi (one kernel call on the CPU, one launch per 24 tensors on CUDA: thread
    blocks finding their tensor) is bitwise the single-tensor op, per tensor."""
    check_multi_equals_single(backend, rule, bits8, device)


@pytest.fixture
def threads():
    """Run with this many intra-op threads, then restore (pytest processes run with 1: conftest.py)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _plant_nonfinite(g: torch.Tensor, step: int) -> torch.Tensor:
    g[[5, 70_000 + 3 * step, 150_000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    return g


@per_backend("", cpu=[()])
def test_results_do_not_depend_on_the_thread_count(backend, threads):
    """The CPU kernels split blocks (and values) over torch's intra-op threads; with 4 threads
    and tensors of hundreds of blocks every op is still the reference bit for bit, skipped
    blocks counted once. The other tests here run single-threaded (tests/conftest.py), so this
    is the test that sees a kernel whose result depends on how the work was split."""
    threads(4)
    for i, rule in enumerate(ALL_RULES):
        for bits8 in BITS:
            case = Case(rule, 200_003, 256, bits8, torch.float32, torch.bfloat16, "cpu", seed=i,
                        grad_fn=_plant_nonfinite)
            run_steps(backend, case, steps=3)
            assert bits8 is False or int(case.dut["skipped"]) > 0, rule  # the planted blocks were skipped
    check_multi_equals_single(backend, Rule.ADAM, True, "cpu")
    check_all_finite_many(backend, "cpu")
    x = torch.randn(300_001, generator=torch.Generator().manual_seed(1)) * 5
    check_quantize_matches_reference(backend, "300k values", x, dynamic_map(True), 256, "cpu")
    p, u = torch.randn(100_001).to(torch.bfloat16), torch.randn(100_001)
    want, got = p.clone(), p.clone()
    ReferenceBackend().trust_step(want, u, 1e-2)
    backend.trust_step(got, u, 1e-2)
    assert torch.equal(got, want)


# ---- LAMB/LARS phase 2 -------------------------------------------------------------------------
TRUST_SIZES = {"cpu": (1, 63, 64, 1000, 70_001), "cuda": (1, 63, 64, 1000, 70_001), "emulated": (1, 63, 64, 1000, 5000)}


TRUST_CASES = [("fp32", None), ("bf16", None), ("fp16", None), ("bf16", 24), ("bf16", 32), ("fp16", 24), ("fp16", 32)]


@per_backend("pdtype,master_bits", all=TRUST_CASES)
def test_trust_step_matches_reference(backend, kind, device, pdtype, master_bits):
    """``param -= fl32(lr * ratio) * update`` (rules.trust_step) in float32, stored in the
    parameter's dtype: bitwise the reference, for sizes that end in partial chunks, an update
    with zeros (skipped blocks), scales that round differently in float32, and a view at an
    offset; with master weights (an int8/int16 correction) on the decoded master, re-encoded."""
    reference = ReferenceBackend()
    gen = torch.Generator().manual_seed(3)
    cdtype = {None: None, 24: torch.int8, 32: torch.int16}[master_bits]
    for n in TRUST_SIZES[kind]:
        for lr_times_ratio in (1e-3 * 1.2345678901, 0.0, -0.7, 3.3e30):
            p = (torch.randn(n, generator=gen) * 0.1).to(DTYPES[pdtype])
            u = torch.randn(n, generator=gen) * 1e-2
            u[::5] = 0
            corr = None
            if cdtype is not None:
                info = torch.iinfo(cdtype)
                corr = torch.randint(info.min, info.max + 1, (n,), generator=gen, dtype=torch.int64).to(cdtype)
            want, want_c = p.clone(), None if corr is None else corr.clone()
            reference.trust_step(want, u, lr_times_ratio, want_c)
            flat = torch.zeros(n + 3, dtype=p.dtype, device=device)
            got = flat[3:]
            got.copy_(p)
            got_c = None if corr is None else corr.clone().to(device)
            backend.trust_step(got, u.to(device), lr_times_ratio, got_c)
            where = f"n={n}, lr*ratio={lr_times_ratio}"
            assert torch.equal(got.cpu(), want), where
            assert corr is None or torch.equal(got_c.cpu(), want_c), f"correction, {where}"
            assert flat[:3].eq(0).all()
            if lr_times_ratio == -0.7 and n > 1:  # a step large enough to move bf16/fp16 values
                assert not torch.equal(want, p), "the step moved nothing: the test would not see a broken kernel"


# ---- quantization and finite checks ------------------------------------------------------------
@per_backend("name,x,q,bs", all=quantize_inputs(20_000, torch.Generator().manual_seed(0)),
             emulated=quantize_inputs(3000, torch.Generator().manual_seed(0)))
def test_quantize_matches_reference(backend, device, name, x, q, bs):
    check_quantize_matches_reference(backend, name, x, q, bs, device)


@per_backend("dtype,n,bs", cpu=[(d, n, bs) for d in DTYPES for n, bs in [(1, 64), (255, 64), (257, 256), (10_001, 2048)]])
def test_quantize_dtypes_sizes(backend, dtype, n, bs):
    x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).to(DTYPES[dtype])
    for q in (dynamic_map(True), dynamic_map(False)):
        codes, absmax = backend.quantize_blockwise(x, q, bs)
        rc, ra = quantize_blockwise(x, q, bs)
        assert torch.equal(codes, rc) and torch.equal(absmax, ra)


@per_backend("", cpu=[()])
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


@per_backend("dtype", emulated=list(DTYPES))
def test_quantize_dtypes_and_nonfinite(backend, dtype):
    x = (torch.randn(300, generator=torch.Generator().manual_seed(1)) * 3).to(DTYPES[dtype])
    x[3], x[100], x[200] = float("nan"), float("inf"), float("-inf")
    for q in (dynamic_map(True), dynamic_map(False)):
        for bs in (64, 256):
            codes, absmax = backend.quantize_blockwise(x, q, bs)
            rc, ra = quantize_blockwise(x, q, bs)
            torch.testing.assert_close(absmax, ra, rtol=0, atol=0, equal_nan=True)
            assert torch.equal(codes, rc), (dtype, bs)


# (length, index of the bad value) of test_all_finite
FINITE_SIZES = {"cpu": (100_003, 77_777), "cuda": (100_003, 77_777), "emulated": (5003, 4321)}


@per_backend("dtype", all=list(DTYPES), emulated=["fp32"])
def test_all_finite(backend, kind, device, dtype):
    n, bad_at = FINITE_SIZES[kind]
    x = torch.randn(n).to(DTYPES[dtype]).to(device)
    assert backend.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[bad_at] = bad
        assert not backend.all_finite(y)
    assert backend.all_finite(torch.empty(0, dtype=DTYPES[dtype], device=device))


@per_backend("", all=[()])
def test_all_finite_many(backend, device):
    """One pass over many tensors: flags per tensor, any dtype, empty tensors, inf/NaN anywhere;
    CUDA: one host sync, 64-tensor launch chunks."""
    check_all_finite_many(backend, device)


# ---- the optimizers end to end on another backend ----------------------------------------------
@per_backend("name", cuda=list(OPTIMIZER_CASES))
def test_optimizer_on_cuda_equals_optimizer_on_cpu(backend, name):
    """The optimizer classes end to end on CUDA (multi-tensor launches over 30 parameters of mixed
    sizes, the finite check with one NaN, GradScaler unscaling in the kernels): bitwise the CPU run."""
    check_optimizer_matches_cpu(name, "cuda")


@per_backend("name", emulated=list(OPTIMIZER_CASES))
def test_optimizer_through_emulated_cuda_kernels_equals_cpu_kernels(backend, name, monkeypatch):
    """The optimizer classes end to end with every kernel call going to the CUDA code (multi-tensor
    launches, finite checks, LAMB/LARS update_out and trust_step, GradScaler): bitwise the CPU kernels' run."""
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


# ---- the CPU build and the op registration -----------------------------------------------------
@per_backend("", cpu=[()])
def test_ops_registered(backend):
    assert hasattr(torch.ops.dist8, "fused_update_") and hasattr(torch.ops.dist8, "trust_step_")
    assert backend.name == "cpu"
    assert RULE_STATES  # the spec is importable alongside the ops


@per_backend("mode", cpu=["hw", "scalar"])
def test_table_lookup_modes_match_reference(backend, monkeypatch, mode):
    """DIST8_CPU_GATHER picks how the AVX2 path loads table entries (hardware gathers or scalar
    loads; other paths ignore it): neither changes a bit, in the fused update or the quantize ops."""
    monkeypatch.setenv("DIST8_CPU_GATHER", mode)
    for i, rule in enumerate((Rule.ADAM, Rule.SGD, Rule.LION)):
        case = Case(rule, 4099, 256, True, torch.float32, torch.float32, "cpu", seed=20 + i)
        run_steps(backend, case, steps=10)
    for name, x, q, bs in quantize_inputs(5_000, torch.Generator().manual_seed(1)):
        check_quantize_matches_reference(backend, name, x, q, bs, "cpu")


@per_backend("codes", cpu=["runs", "table"])
def test_code_modes_match_reference(backend, monkeypatch, codes):
    """DIST8_CPU_CODES picks whether the AVX-512 path computes the codes of a map made of linear runs
    (the dynamic map) or looks them up (other paths ignore it): neither changes a bit, in the fused
    update (Adam's two maps, one-state rules, bf16 parameters, a partial last block) or the quantize ops."""
    monkeypatch.setenv("DIST8_CPU_CODES", codes)
    for i, rule in enumerate((Rule.ADAM, Rule.SGD, Rule.LION, Rule.RMSPROP)):
        run_steps(backend, Case(rule, 4099, 256, True, torch.float32, torch.float32, "cpu", seed=40 + i), steps=10)
    run_steps(backend, Case(Rule.ADAM, 3000, 128, True, torch.bfloat16, torch.bfloat16, "cpu", seed=45), steps=10)
    for name, x, q, bs in quantize_inputs(5_000, torch.Generator().manual_seed(2)):
        check_quantize_matches_reference(backend, name, x, q, bs, "cpu")


@per_backend("", cpu=[()])
def test_bad_table_lookup_mode_is_refused(backend, monkeypatch):
    monkeypatch.setenv("DIST8_CPU_GATHER", "fast")
    with pytest.raises((RuntimeError, ValueError), match="DIST8_CPU_GATHER"):
        backend.quantize_blockwise(torch.randn(1000), dynamic_map(True), 256)


@per_backend("", emulated=[()], cuda=[()])
def test_bad_cuda_kernel_variant_is_refused(backend, device, monkeypatch):
    """Before: any DIST8_CUDA_KERNEL but "warp" (a typo too) ran the block kernels, silently."""
    monkeypatch.setenv("DIST8_CUDA_KERNEL", "wrap")
    with pytest.raises(RuntimeError, match="DIST8_CUDA_KERNEL must be 'block' or 'warp', got 'wrap'"):
        run_steps(backend, Case(Rule.ADAM, 300, 64, True, torch.float32, torch.float32, device, seed=3), steps=1)


@per_backend("rule", all=[Rule.ADAM, Rule.ADEMAMIX], emulated=[Rule.ADAM])
def test_states_with_different_maps(backend, kind, device, rule):
    """A call whose states use different maps (fp8 for the first, the dynamic map for the others,
    and the reverse): the CPU kernel's pipeline compiles one codec in, so it runs such a call block by
    block; every backend still equals the reference bit for bit."""
    n = 300 if kind == "emulated" else 2000
    for i, maps in enumerate(("fp8+dynamic", "dynamic+fp8")):
        run_steps(backend, Case(rule, n, 64 if kind == "emulated" else 256, True, torch.float32, torch.float32, device,
                                seed=40 + i, map_name=maps), steps=3 if kind == "emulated" else 10)


@per_backend("", cpu=[()])
def test_info_names_the_cpu_code_path(backend):
    """`dist8 info` says which CPU code path the build uses (AVX-512 with or without VBMI, AVX2, portable)
    and where the build lives."""
    from dist8.kernels import build
    from dist8.kernels.registry import backend_report

    why = backend_report()["cpu"]["why"]
    assert f"native kernels built and loaded from {build.build_directory('cpu')}:" in why
    assert any(path in why for path in ("avx512", "avx2", "portable")), why


@per_backend("", cpu=[()])
def test_ops_trace_under_torch_compile(backend):
    """Fake kernels: torch.compile(fullgraph=True) traces quantize/dequantize and the in-place updates."""
    from dist8.kernels.native import scalar_values

    q1, q2 = dynamic_map(True), dynamic_map(False)
    values = scalar_values(scalars_for(Rule.ADAM, 0, torch.Generator().manual_seed(0)))
    empty = torch.empty(0)

    def step(p, g, s1, s2, a1, a2):
        no_correction = empty.to(torch.int8)
        torch.ops.dist8.fused_update_(int(Rule.ADAM), p, g, s1, s2, a1, a2, q1, q2, values, 0, 256, empty, empty.long(),
                                      empty, empty, no_correction)
        torch.ops.dist8.trust_step_(p, g.float(), 0.5, no_correction)
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


# ---- the scalars the kernels read ----------------------------------------------------------------
def test_scalars_tuple_is_the_field_order():
    """The kernels read Scalars positionally: as_tuple must list every field, in declaration order."""
    from dataclasses import astuple, fields

    import re

    from dist8.kernels.build import csrc_dir

    header = (csrc_dir() / "include" / "dist8_rules.h").read_text()
    s = Scalars(*[float(i) for i in range(len(fields(Scalars)))])
    assert s.as_tuple() == astuple(s)
    assert len(s.as_tuple()) == int(re.search(r"NUM_SCALARS = (\d+)", header).group(1))  # what the kernels read


def test_per_rule_scalars_fill_the_documented_slots():
    """Each rule's constructor puts its own names into the kernel slots (rules.Scalars' table)."""
    assert Scalars.for_momentum(lr=0.1, momentum=0.9, dampening=0.25, weight_decay=0.01) == Scalars(
        lr=0.1, beta1=0.9, one_minus_beta1=0.75, grad_wd=0.01)
    assert Scalars.for_rmsprop(lr=0.1, alpha=0.99, eps=1e-8, weight_decay=0.01) == Scalars(
        lr=0.1, beta1=0.99, one_minus_beta1=1.0 - 0.99, eps=1e-8, grad_wd=0.01)
    assert Scalars.for_adagrad(lr=0.1, eps=1e-10, weight_decay=0.01) == Scalars(lr=0.1, eps=1e-10, grad_wd=0.01)
    assert Scalars.for_lion(lr=0.1, beta1=0.9, beta2=0.99, decay=0.5) == Scalars(
        lr=0.1, beta1=0.9, one_minus_beta1=1.0 - 0.9, beta2=0.99, one_minus_beta2=1.0 - 0.99, decay=0.5)
    assert Scalars.for_adam(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, bc1=0.1, bc2_sqrt=0.2, grad_wd=0.3, decay=0.4,
                            update_wd=0.5, grad_scale=0.6) == Scalars(
        0.1, 0.9, 1.0 - 0.9, 0.999, 1.0 - 0.999, 1e-8, 0.3, 0.4, 0.1, 0.2, 0.6, 0.5)
