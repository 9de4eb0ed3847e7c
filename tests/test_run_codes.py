"""The AVX-512 path's computed codes for maps made of linear runs (csrc/cpu/runs_cpu.h).

The codes of the dynamic map are computed (a run from the float's exponent, one multiply-add, a
floor) instead of looked up, with the key table's exact code where a value lies too close to a
switch point to call. These tests hold that path to the key table for every float32 input, and
to the reference on maps built to break it. The step's own bit-exactness under both settings of
DIST8_CPU_CODES is in test_kernels.py (test_code_modes_match_reference).
"""
from __future__ import annotations

import pytest
import torch
from dist8.kernels import native
from dist8.quant import quantize_blockwise
from dist8.quant.maps import dynamic_map, linear_map


@pytest.fixture(scope="module")
def avx512():
    native.load_backend("cpu")
    features = torch.ops.dist8_cpu_info.features()
    if not features.startswith("avx512"):
        pytest.skip(f"the run codes are the AVX-512 path's; this build is: {features}")
    return features


def codes_of(qmap: torch.Tensor, setting: str, monkeypatch) -> str:
    monkeypatch.setenv("DIST8_CPU_CODES", setting)
    return torch.ops.dist8_cpu_info.map_codes(qmap)


@pytest.mark.parametrize("signed", [True, False])
def test_every_float32_gets_the_key_tables_code(avx512, signed, monkeypatch):
    """All 2^32 inputs (NaNs, infinities, subnormals, beyond +-1 included) through the vector path:
    no wrong code, and the lanes it hands to the key table are the NaNs and a few per million."""
    q = dynamic_map(signed)
    assert codes_of(q, "runs", monkeypatch) == "linear runs"
    values, marked, wrong = torch.ops.dist8_cpu_info.run_codes_check(q, 0, 2**32 - 1)
    assert values == 2**32 and wrong == 0
    nans = 2 * (2**23 - 1)
    assert nans <= marked < nans + 2**32 // 10_000, marked


def test_the_setting_chooses_the_path(avx512, monkeypatch):
    assert codes_of(dynamic_map(True), "table", monkeypatch) == "key table"
    assert "every map's codes looked up (" in torch.ops.dist8_cpu_info.features()
    monkeypatch.setenv("DIST8_CPU_CODES", "runs")
    assert "codes of linear-run maps computed (" in torch.ops.dist8_cpu_info.features()
    assert codes_of(linear_map(False), "runs", monkeypatch) == "linear runs"  # one run
    monkeypatch.setenv("DIST8_CPU_CODES", "fast")
    with pytest.raises((RuntimeError, ValueError), match="DIST8_CPU_CODES must be 'runs' or 'table', got 'fast'"):
        torch.ops.dist8_cpu_info.map_codes(dynamic_map(True))


def boundary_inputs(q: torch.Tensor) -> torch.Tensor:
    """Every map value and switch point with its four float neighbours, both signs, in blocks of 64
    that each start with 1.0 (absmax 1: the values reach the code search as constructed)."""
    mids = (q[:-1] + q[1:]) / 2
    pts = [q, mids]
    for _ in range(4):
        pts += [torch.nextafter(pts[-2], torch.tensor(2.0)), torch.nextafter(pts[-1], torch.tensor(-2.0))]
    x = torch.cat(pts).clamp(-1, 1)
    x = torch.cat([x, -x])
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    blocks = x[: x.numel() // 63 * 63].view(-1, 63)
    return torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)


def nudged_maps():
    """Maps near the dynamic map: a value moved by one ulp, a run broken in two, too many runs."""
    q = dynamic_map(True)
    one_ulp = q.clone()
    one_ulp[200] = torch.nextafter(one_ulp[200], torch.tensor(2.0))
    broken = dynamic_map(False).clone()
    broken[150] = (broken[149] + broken[150] * 3) / 4  # uneven steps around code 150
    many = torch.cat([torch.zeros(1), torch.logspace(-7, 0, 255)]).sort().values  # no two steps equal
    shifted = dynamic_map(False) * 0.75
    shifted[-1] = 1.0  # a top run that ends below 1.0's neighbour
    return {"one-ulp": one_ulp, "broken-run": broken, "logspace": many, "shifted": shifted}


@pytest.mark.parametrize("name", list(nudged_maps()))
def test_maps_near_the_dynamic_map_stay_exact(avx512, name, monkeypatch):
    """Whatever the map, the vector path either proves its runs exact or keeps the key table:
    the quantize op equals the reference at every switch point and its float neighbours."""
    q = nudged_maps()[name]
    path = codes_of(q, "runs", monkeypatch)
    assert path in ("linear runs", "key table"), path
    if name == "logspace":
        assert path == "key table"  # 255 runs of one or two codes: more than a zmm holds
    x = boundary_inputs(q)
    codes, absmax = torch.ops.dist8.quantize_blockwise(x, q, 64)
    ref_codes, ref_absmax = quantize_blockwise(x, q, 64)
    assert torch.equal(absmax, ref_absmax)
    wrong = (codes != ref_codes).nonzero().flatten()
    assert wrong.numel() == 0, f"{name} ({path}): {wrong.numel()} codes differ, e.g. x={x[wrong[0]].item()!r}"
