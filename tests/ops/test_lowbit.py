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


@pytest.mark.parametrize(
    "shape, dtype, centred",
    [
        ((2, 3, 37, 64), torch.bfloat16, True),
        ((1, 2, 2100, 16), torch.float32, False),
        ((1, 5, 9, 128), torch.float16, True),
    ],
)
def test_per_head_fp8_kernel_equals_the_reference_bit_for_bit(shape, dtype, centred, quiet_numpy):
    from sparse_attn.ops.lowbit.triton import quantize_per_head_triton

    generator = torch.Generator().manual_seed(41)
    x = (torch.randn(shape, generator=generator) * torch.rand(shape[:2] + (1, 1), generator=generator) * 5).to(dtype)
    x[:, -1] = 0  # an all-zero head keeps scale 1 and zero codes
    x = x.transpose(1, 2).contiguous().transpose(1, 2)  # rows strided by H * D, as models lay q out
    center = sequence_mean(x) if centred else None
    if centred:
        center[:, -1] = 0
    codes, scale = lowbit_naive.quantize_per_head(x, "fp8", center=center)
    with quiet_numpy():
        kernel_codes, kernel_scale = quantize_per_head_triton(x, "fp8", center=center)
    assert torch.equal(kernel_scale, scale)
    assert torch.equal(kernel_codes.view(torch.uint8), codes.view(torch.uint8))
    assert bool((scale[:, -1] == 1).all()) and not bool(kernel_codes[:, -1].float().any())


def test_per_head_fp8_kernel_checks_its_case():
    from sparse_attn.ops.lowbit.triton import quantize_per_head_triton, unsupported_reason

    x = torch.randn(1, 2, 8, 16)
    assert "fp8 only" in unsupported_reason(x, "int4")
    assert "power-of-two head_dim" in unsupported_reason(torch.randn(1, 2, 8, 24))
    with pytest.raises(ValueError, match=r"center"):
        quantize_per_head_triton(x, "fp8", center=torch.zeros(1, 2, 8, 16))


@pytest.mark.gpu
def test_per_head_fp8_kernel_equals_the_reference_on_gpu():
    from sparse_attn.ops.lowbit import quantize_per_head

    x = torch.randn(2, 8, 8191, 128, device="cuda", dtype=torch.bfloat16) * 3 + 1
    center = sequence_mean(x)
    codes, scale = quantize_per_head(x, "fp8", center=center)  # the kernel on CUDA
    reference_codes, reference_scale = lowbit_naive.quantize_per_head(x, "fp8", center=center)
    assert torch.equal(scale, reference_scale)
    assert torch.equal(codes.view(torch.uint8), reference_codes.view(torch.uint8))


def test_per_head_fp8_kernel_rounds_once_near_midpoints(quiet_numpy):
    # Quotients just below a midpoint of two e4m3 codes round down; rounding through float16
    # first would make them the midpoint and round them up to the even code (seen on the H200).
    from sparse_attn.ops.lowbit.triton import quantize_per_head_triton

    values = [448.0, 0.121093735, -91.9999924, 24.999998, 0.12109375, -92.0, 0.0029296875, -0.0, 1e-10, -1e-10]
    values += [3.0e-3, -0.3046875, 13.000001, 447.99, -447.99, 0.5]
    x = torch.tensor(values, dtype=torch.float32).view(1, 1, 1, 16)  # absmax 448: step 1, quotients = values
    with quiet_numpy():
        codes, scale = quantize_per_head_triton(x, "fp8")
    assert float(scale) == 1.0
    assert torch.equal(codes.view(torch.uint8), x.to(torch.float8_e4m3fn).view(torch.uint8))
