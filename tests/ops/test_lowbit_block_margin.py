"""Block margins of low-bit logits (SALE's rule): reference against brute force, kernel against reference."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.lowbit import quantize
from sparse_attn.ops.lowbit_block_margin import lowbit_block_margin
from sparse_attn.ops.lowbit_block_margin import naive as margin_naive


def brute_force(q_codes, q_scale, k_codes, k_scale, threshold, block_q, block_k, bias=None, positions=None):
    """Every pair's margin in float64, reduced per block pair by slicing."""
    group = q_codes.shape[1] // k_codes.shape[1]
    keys = k_codes.double().repeat_interleave(group, 1)
    logits = (q_codes.double() @ keys.transpose(-1, -2)) * q_scale.double()[..., None]
    logits = logits * k_scale.double().repeat_interleave(group, 1)[:, :, None, :]
    if bias is not None:
        logits = logits + bias.double()[:, :, None, :]
    margin = logits - threshold.double()[..., None]
    if positions is not None:
        margin = margin.masked_fill(torch.arange(k_codes.shape[2])[None, :] > positions[:, None], float("-inf"))
    rows, seq_k = margin.shape[2:]
    return torch.stack(
        [
            torch.stack(
                [margin[:, :, i : i + block_q, j : j + block_k].amax(dim=(-1, -2)) for j in range(0, seq_k, block_k)],
                dim=-1,
            )
            for i in range(0, rows, block_q)
        ],
        dim=2,
    ).float()


def codes_case(batch, q_heads, kv_heads, rows, seq_k, dim, fmt, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, rows, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    q_codes, q_scale = quantize(q, fmt)
    k_codes, k_scale = quantize(k, fmt)
    threshold = torch.randn(batch, q_heads, rows, generator=generator) * 3
    bias = torch.randn(batch, q_heads, seq_k, generator=generator)
    # Positions: a row that sees no key, rows past the keys (Sq < Sk and beyond).
    positions = torch.randint(-1, seq_k + 3, (rows,), generator=generator)
    return q_codes, q_scale * dim**-0.5, k_codes, k_scale, threshold, bias, positions


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, rows, seq_k, dim, block_q, block_k, fmt",
    [
        (2, 4, 1, 21, 50, 16, 8, 16, "int4"),
        (1, 6, 2, 9, 37, 8, 4, 8, "fp8"),
        (1, 3, 3, 16, 64, 16, 16, 32, "int4"),
        (2, 5, 5, 7, 33, 32, 2, 7, "fp8"),
    ],
)
def test_reference_matches_brute_force(batch, q_heads, kv_heads, rows, seq_k, dim, block_q, block_k, fmt, monkeypatch):
    q_codes, q_scale, k_codes, k_scale, threshold, bias, positions = codes_case(
        batch, q_heads, kv_heads, rows, seq_k, dim, fmt, seed=rows * seq_k
    )
    for kwargs in ({}, dict(key_bias=bias, q_positions=positions)):
        expected = brute_force(
            q_codes, q_scale, k_codes, k_scale, threshold, block_q, block_k,
            kwargs.get("key_bias"), kwargs.get("q_positions"),
        )  # fmt: skip
        got = lowbit_block_margin(
            q_codes, q_scale, k_codes, k_scale, threshold, block_q=block_q, block_k=block_k, **kwargs
        )
        assert got.shape == (batch, q_heads, -(-rows // block_q), -(-seq_k // block_k))
        assert torch.equal(got == float("-inf"), expected == float("-inf"))
        finite = expected.isfinite()
        assert torch.allclose(got[finite], expected[finite], atol=1e-4, rtol=1e-5)
    # One query block per chunk gives the same margins.
    monkeypatch.setattr(margin_naive, "CHUNK_ELEMENTS", 1)
    chunked = lowbit_block_margin(
        q_codes, q_scale, k_codes, k_scale, threshold, block_q=block_q, block_k=block_k, key_bias=bias,
        q_positions=positions,
    )  # fmt: skip
    expected = brute_force(q_codes, q_scale, k_codes, k_scale, threshold, block_q, block_k, bias, positions)
    finite = expected.isfinite()
    assert torch.equal(chunked.isfinite(), finite)
    assert torch.allclose(chunked[finite], expected[finite], atol=1e-4, rtol=1e-5)


# The kernel (ops/lowbit_block_margin/triton.py), called directly under the interpreter, against the reference.
KERNEL_CASES = [
    # batch, q_heads, kv_heads, rows, seq_k, dim, block_q, block_k, fmt
    (2, 6, 2, 37, 77, 32, 16, 16, "int4"),  # partial last query block, GQA 3
    (1, 8, 1, 20, 50, 32, 16, 32, "fp8"),  # GQA 8
    (1, 3, 3, 40, 45, 64, 32, 16, "int4"),  # Sq < Sk through positions
    (1, 4, 2, 70, 64, 32, 256, 16, "int4"),  # a query block of several row tiles
]


@pytest.mark.parametrize("batch, q_heads, kv_heads, rows, seq_k, dim, block_q, block_k, fmt", KERNEL_CASES)
def test_kernel_matches_reference(batch, q_heads, kv_heads, rows, seq_k, dim, block_q, block_k, fmt, monkeypatch):
    from sparse_attn.ops.lowbit_block_margin import triton as margin_triton

    q_codes, q_scale, k_codes, k_scale, threshold, bias, positions = codes_case(
        batch, q_heads, kv_heads, rows, seq_k, dim, fmt, seed=rows + seq_k
    )
    late = torch.randint(seq_k // 2, seq_k + 3, (rows,), generator=torch.Generator().manual_seed(rows))
    monkeypatch.setattr(margin_triton, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    # Few programs per launch so that the KV split leaves ranges of several blocks.
    monkeypatch.setattr(margin_triton, "_TARGET_PROGRAMS", 3)
    if block_q > 128:
        monkeypatch.setattr(margin_triton, "_MAX_BLOCK_M", 16)  # several tiles per query block at a small size
    for kwargs in ({}, dict(key_bias=bias, q_positions=positions), dict(q_positions=late)):
        arguments = (q_codes, q_scale, k_codes, k_scale, threshold)
        expected = margin_naive.lowbit_block_margin(*arguments, block_q=block_q, block_k=block_k, **kwargs)
        got = margin_triton.lowbit_block_margin_triton(*arguments, block_q=block_q, block_k=block_k, **kwargs)
        assert not got.isnan().any()
        assert torch.equal(got == float("-inf"), expected == float("-inf"))
        finite = expected.isfinite()
        assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-4)


def test_kernel_refuses_unsupported_cases():
    from sparse_attn.ops.lowbit_block_margin import triton as margin_triton

    codes = torch.zeros(1, 2, 3, 32, dtype=torch.int8)
    assert margin_triton.unsupported_reason(codes, k_codes=codes, block_q=16, block_k=16) is None
    assert "head_dim" in margin_triton.unsupported_reason(
        codes[..., :16], k_codes=codes[..., :16], block_q=16, block_k=16
    )
    assert "block_k" in margin_triton.unsupported_reason(codes, k_codes=codes, block_q=16, block_k=24)
    assert "block_q" in margin_triton.unsupported_reason(codes, k_codes=codes, block_q=8, block_k=16)
    assert "codes" in margin_triton.unsupported_reason(codes.float(), k_codes=codes, block_q=16, block_k=16)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_kernel_matches_reference_on_gpu(fmt):
    from sparse_attn.ops.lowbit_block_margin import triton as margin_triton

    generator = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(1, 32, 1000, 128, device="cuda", generator=generator)
    k = torch.randn(1, 8, 8192, 128, device="cuda", generator=generator)
    q_codes, q_scale = quantize(q, fmt)
    k_codes, k_scale = quantize(k, fmt)
    threshold = torch.randn(1, 32, 1000, device="cuda", generator=generator) * 3 + 10
    bias = torch.randn(1, 32, 8192, device="cuda", generator=generator)
    positions = torch.arange(1000, device="cuda") + 7192
    arguments = (q_codes, q_scale * 128**-0.5, k_codes, k_scale, threshold)
    options = dict(block_q=128, block_k=128, key_bias=bias, q_positions=positions)
    expected = margin_naive.lowbit_block_margin(*arguments, **options)
    got = margin_triton.lowbit_block_margin_triton(*arguments, **options)
    assert torch.equal(got == float("-inf"), expected == float("-inf"))
    finite = expected.isfinite()
    assert torch.allclose(got[finite], expected[finite], rtol=1e-5, atol=1e-3)
