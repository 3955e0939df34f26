"""Low-bit quantisation emulation: codes, scales and round trips against brute force."""

from __future__ import annotations

import pytest
import torch
from helpers import random_qkv

from sparse_attn.ops.lowbit import dequantize, quantize, sequence_mean
from sparse_attn.ops.lowbit import naive as lowbit_naive


def test_int4_codes_are_rounded_integers_within_seven_and_scales_are_absmax_over_seven():
    x, _, _ = random_qkv(2, 3, 1, 37, 37, 16, seed=0)
    codes, scale = quantize(x, "int4")
    assert codes.dtype == torch.int8 and scale.shape == x.shape[:3]
    assert int(codes.abs().max()) == 7
    assert torch.allclose(scale, x.abs().amax(-1) / 7)
    assert torch.equal(codes.float(), torch.round(x / scale[..., None]))
    # Round to nearest: the error of each entry is at most half a step.
    assert bool(((dequantize(codes, scale) - x).abs() <= 0.5 * scale[..., None] + 1e-6).all())


def test_fp8_round_trip_is_close_and_zero_tokens_stay_zero():
    x, _, _ = random_qkv(1, 2, 1, 20, 20, 32, seed=1)
    x[:, :, 3] = 0.0
    codes, scale = quantize(x, "fp8")
    assert codes.dtype == torch.float8_e4m3fn
    back = dequantize(codes, scale)
    assert torch.equal(back[:, :, 3], torch.zeros_like(back[:, :, 3]))
    assert float((back - x).abs().max() / x.abs().max()) < 0.07  # e4m3 keeps 3 mantissa bits


def test_centering_does_not_modify_the_input_and_chunking_gives_the_same_codes(monkeypatch):
    x, _, _ = random_qkv(2, 2, 1, 45, 45, 8, seed=2)
    original = x.clone()
    center = sequence_mean(x)
    whole = quantize(x, "int4", center=center)
    assert torch.equal(x, original)
    assert torch.allclose(center, x.mean(2, keepdim=True))
    monkeypatch.setattr(lowbit_naive, "CHUNK_ELEMENTS", 64)
    chunked = quantize(x, "int4", center=center)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_unknown_format_is_rejected():
    with pytest.raises(ValueError, match="fmt"):
        quantize(torch.zeros(1, 1, 2, 4), "int3")


def test_per_head_scales_are_each_heads_absmax_and_chunking_gives_the_same_codes(monkeypatch):
    x, _, _ = random_qkv(2, 3, 1, 41, 41, 16, seed=3)
    x[1, 2] = 0.0  # an all-zero head keeps scale 1 and zero codes
    center = sequence_mean(x)
    codes, scale = lowbit_naive.quantize_per_head(x, "fp8", center=center)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (2, 3)
    centred = x - center
    expected = centred.abs().amax(dim=(2, 3)) / 448
    expected[1, 2] = 1.0
    assert torch.allclose(scale, expected)
    assert torch.equal(codes.float(), (centred / scale[:, :, None, None]).to(torch.float8_e4m3fn).float())
    assert torch.equal(codes[1, 2].float(), torch.zeros_like(x[1, 2]))
    monkeypatch.setattr(lowbit_naive, "CHUNK_ELEMENTS", 41 * 16 * 2)  # one head at a time
    chunked = lowbit_naive.quantize_per_head(x, "fp8", center=center)
    assert torch.equal(chunked[0].float(), codes.float()) and torch.equal(chunked[1], scale)
    int4_codes, _ = lowbit_naive.quantize_per_head(x, "int4")
    assert int(int4_codes.abs().max()) == 7
    with pytest.raises(ValueError, match="fmt"):
        lowbit_naive.quantize_per_head(x, "fp4")
