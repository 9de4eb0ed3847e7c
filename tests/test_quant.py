"""Quantization maps and block-wise quantize/dequantize against brute force."""
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dist8.quant import dequantize_blockwise, dynamic_map, linear_map, quantize_blockwise


def _recip(a: torch.Tensor) -> torch.Tensor:
    """float32 reciprocal of a normal absmax, else 1 (written out, not dist8's helper)."""
    one = torch.tensor(1.0, dtype=torch.float32)
    return one / a if a >= torch.finfo(torch.float32).tiny else one


def brute_force_codes(x: torch.Tensor, qmap: torch.Tensor, block_size: int):
    """argmin |x * fl(1/absmax) - q| with ties towards the code of smaller magnitude."""
    flat = x.reshape(-1).float()
    codes = torch.empty(flat.numel(), dtype=torch.long)
    absmax = []
    for start in range(0, flat.numel(), block_size):
        block = flat[start : start + block_size]
        a = block.abs().max()
        absmax.append(a)
        norm = block * _recip(a)
        dist = (norm[:, None] - qmap[None, :]).abs()
        best = dist.min(dim=1, keepdim=True).values
        candidates = torch.where(dist == best, qmap.abs()[None, :], torch.full_like(dist, float("inf")))
        codes[start : start + block.numel()] = candidates.argmin(dim=1)
    return codes, torch.stack(absmax)


def test_dynamic_map_shape_and_order():
    for signed in (True, False):
        q = dynamic_map(signed)
        assert q.dtype == torch.float32 and q.shape == (256,)
        assert torch.all(q[1:] >= q[:-1])
        assert 0.0 in q.tolist() and q.max() == 1.0
    assert dynamic_map(False).min() == 0.0
    assert dynamic_map(True).min() < -0.99


def test_dynamic_map_matches_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes not installed")
    for signed in (True, False):
        assert torch.equal(dynamic_map(signed), bnb.create_dynamic_map(signed=signed))


def test_linear_map():
    assert torch.allclose(linear_map(False)[[0, -1]], torch.tensor([0.0, 1.0]))
    assert 0.0 in linear_map(True).tolist()


floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=700), signed=st.booleans(), block_pow=st.integers(6, 8))
def test_codes_exact_against_brute_force(values, signed, block_pow):
    block = 2**block_pow
    x = torch.tensor(values, dtype=torch.float32)
    if not signed:
        x = x.abs()
    q = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, q, block)
    want_codes, want_absmax = brute_force_codes(x, q, block)
    assert torch.equal(absmax, want_absmax)
    # Brute force and exact search may differ only where two codes are exactly equidistant
    # in float32 from both sides -- then both must give the same error.
    recip = torch.stack([_recip(a) for a in want_absmax])
    norm = x * recip.repeat_interleave(block)[: x.numel()]
    err_got = (norm - q[codes.long()]).abs()
    err_want = (norm - q[want_codes]).abs()
    assert torch.equal(err_got, err_want)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=600), signed=st.booleans())
@example(values=[-275011.0], signed=True)  # found on torch 2.6: -absmax against the old bound
def test_round_trip_error_bounded_by_half_gap(values, signed):
    x = torch.tensor(values, dtype=torch.float32)
    if not signed:
        x = x.abs()
    q = dynamic_map(signed)
    codes, absmax = quantize_blockwise(x, q, 64)
    back = dequantize_blockwise(codes, absmax, q, 64)
    scale = absmax.repeat_interleave(64)[: x.numel()]
    c = codes.long()
    # Half the gap to each neighbour; the end codes reach the end of the normalized range instead
    # (the signed map's lowest code is -0.99297, not -1: -absmax is 0.00703 from it, which is
    # half the gap above it only up to float rounding).
    lowest = -1.0 if signed else 0.0
    up = torch.where(c == 255, 1.0 - q[c], (q[(c + 1).clamp(max=255)] - q[c]) / 2)
    down = torch.where(c == 0, q[c] - lowest, (q[c] - q[(c - 1).clamp(min=0)]) / 2)
    bound = torch.maximum(up, down) * scale
    assert torch.all((back - x).abs() <= bound * (1 + 1e-5) + 1e-30)


def test_zero_maps_to_zero_code_and_zero_blocks():
    for signed in (True, False):
        q = dynamic_map(signed)
        x = torch.zeros(300)
        x[290] = 3.0
        codes, absmax = quantize_blockwise(x, q, 256)
        assert absmax[0] == 0 and absmax[1] == 3.0
        assert torch.all(q[codes[:256].long()] == 0)
        back = dequantize_blockwise(codes, absmax, q, 256)
        assert torch.equal(back, x)


def test_any_shape_and_partial_last_block():
    x = torch.randn(3, 5, 37)
    q = dynamic_map(True)
    codes, absmax = quantize_blockwise(x, q, 64)
    assert codes.shape == x.shape and codes.dtype == torch.uint8
    assert absmax.shape == ((x.numel() + 63) // 64,)
    assert dequantize_blockwise(codes, absmax, q, 64).shape == x.shape


@pytest.mark.parametrize("bad", [32, 100, 0, -256])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        quantize_blockwise(torch.ones(10), dynamic_map(True), bad)


def test_subnormal_and_special_absmax_normalise_by_one():
    """Blocks whose absmax is zero, subnormal or NaN are multiplied by 1 (no overflowing reciprocal)."""
    from dist8.quant import block_reciprocal

    tiny = torch.finfo(torch.float32).tiny
    a = torch.tensor([0.0, tiny / 4, tiny, 2.0, float("inf"), float("nan")])
    r = block_reciprocal(a)
    assert r[0] == 1 and r[1] == 1 and r[5] == 1
    assert r[2] == torch.tensor(1.0) / torch.tensor(tiny) and r[3] == 0.5 and r[4] == 0
    q = dynamic_map(True)
    x = torch.full((64,), 3e-40)
    x[::2] = -3e-40
    codes, absmax = quantize_blockwise(x, q, 64)
    zero_code = int((q == 0).nonzero())
    assert absmax.item() == pytest.approx(3e-40, rel=1e-3) and codes.eq(zero_code).all()
    assert dequantize_blockwise(codes, absmax, q, 64).eq(0).all()
