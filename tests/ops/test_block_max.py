"""Block maxima of logits against brute force: GQA, partial blocks, causal rows, scales, bias, key chunks."""

from __future__ import annotations

import pytest
import torch
from helpers import random_qkv

from sparse_attn.ops.block_max import block_max_logits
from sparse_attn.ops.block_max import naive as block_max_naive


def brute_force(q, k, block_k, positions=None, key_scale=None, key_bias=None):
    group = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    if key_scale is not None:
        logits = logits * key_scale.double().repeat_interleave(group, 1)[:, :, None, :]
    if key_bias is not None:
        logits = logits + key_bias.double()[:, :, None, :]
    if positions is not None:
        logits = logits.masked_fill(torch.arange(k.shape[2])[None, :] > positions[:, None], float("-inf"))
    n_kv = -(-k.shape[2] // block_k)
    return torch.stack([logits[..., j * block_k : (j + 1) * block_k].amax(-1) for j in range(n_kv)], dim=-1).float()


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, rows, seq_k, dim, block_k",
    [(2, 4, 1, 9, 50, 16, 16), (1, 12, 4, 5, 37, 8, 8), (1, 6, 3, 3, 64, 16, 32), (2, 8, 8, 4, 33, 64, 7)],
)
def test_block_max_matches_brute_force(batch, q_heads, kv_heads, rows, seq_k, dim, block_k, monkeypatch):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, rows, seq_k, dim, seed=rows)
    positions = torch.randint(0, seq_k, (rows,), generator=torch.Generator().manual_seed(3))
    key_scale = torch.rand(batch, kv_heads, seq_k) + 0.5
    key_bias = torch.randn(batch, q_heads, seq_k)
    for kwargs in (
        {},
        dict(q_positions=positions),
        dict(key_scale=key_scale, key_bias=key_bias, q_positions=positions),
    ):
        expected = brute_force(
            q, k, block_k, kwargs.get("q_positions"), kwargs.get("key_scale"), kwargs.get("key_bias")
        )
        result = block_max_logits(q, k, block_k=block_k, **kwargs)
        assert torch.allclose(result, expected, atol=1e-4, rtol=1e-5)
    # One key block per chunk gives the same maxima.
    monkeypatch.setattr(block_max_naive, "CHUNK_ELEMENTS", 1)
    chunked = block_max_logits(q, k, block_k=block_k, q_positions=positions, key_scale=key_scale, key_bias=key_bias)
    assert torch.allclose(chunked, brute_force(q, k, block_k, positions, key_scale, key_bias), atol=1e-4, rtol=1e-5)


def test_low_bit_codes_are_accepted_as_keys():
    q, k, _ = random_qkv(1, 2, 1, 4, 20, 8, seed=4)
    codes = torch.round(k * 2).clamp(-7, 7).to(torch.int8)
    assert torch.allclose(block_max_logits(q, codes, block_k=8), brute_force(q, codes.float(), 8), atol=1e-4)


# The kernel (ops/block_max/triton.py), called directly under the interpreter, against the reference.
KERNEL_CASES = [
    # batch, q_heads, kv_heads, rows, seq_k, dim, block_k, q dtype, k dtype
    (2, 6, 2, 9, 77, 16, 16, torch.float32, torch.float32),
    (1, 3, 1, 70, 130, 32, 32, torch.float32, torch.float16),  # the split query (mode 2); GQA 3
    (1, 4, 4, 5, 40, 64, 16, torch.float16, torch.float16),  # one 16-bit dtype (mode 1)
    (1, 8, 1, 4, 50, 16, 16, torch.float32, torch.int8),  # int4 codes, GQA 8
]


@pytest.mark.parametrize("batch, q_heads, kv_heads, rows, seq_k, dim, block_k, q_dtype, k_dtype", KERNEL_CASES)
def test_kernel_matches_reference(batch, q_heads, kv_heads, rows, seq_k, dim, block_k, q_dtype, k_dtype, monkeypatch):
    from sparse_attn.ops.block_max import triton as block_max_triton

    q, k, _ = random_qkv(batch, q_heads, kv_heads, rows, seq_k, dim, seed=rows + seq_k)
    q = q.to(q_dtype)
    k = torch.round(k * 2).clamp(-7, 7).to(torch.int8) if k_dtype == torch.int8 else k.to(k_dtype)
    generator = torch.Generator().manual_seed(rows)
    # Positions include a row that sees no key and rows past the keys (Sq < Sk and beyond).
    positions = torch.randint(-1, seq_k + 3, (rows,), generator=generator)
    key_scale = torch.rand(batch, kv_heads, seq_k, generator=generator) + 0.5
    key_bias = torch.randn(batch, q_heads, seq_k, generator=generator)
    monkeypatch.setattr(block_max_triton, "_empty", lambda *a, **kw: torch.full(*a, float("nan"), **kw))
    # Few programs per launch so that the KV split leaves ranges of several blocks.
    monkeypatch.setattr(block_max_triton, "_TARGET_PROGRAMS", 3)
    late = torch.randint(seq_k // 2, seq_k + 3, (rows,), generator=generator)  # some blocks seen whole by every row
    for kwargs in ({}, dict(q_positions=positions, key_scale=key_scale, key_bias=key_bias), dict(q_positions=late)):
        expected = block_max_naive.block_max_logits(q, k, block_k=block_k, **kwargs)
        got = block_max_triton.block_max_logits_triton(q, k, block_k=block_k, **kwargs)
        assert not got.isnan().any()
        assert torch.equal(got == float("-inf"), expected == float("-inf"))
        finite = expected.isfinite()
        assert torch.allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_kernel_refuses_unsupported_cases():
    from sparse_attn.ops.block_max import triton as block_max_triton

    q, k = torch.zeros(1, 2, 3, 24), torch.zeros(1, 1, 10, 24)
    assert "head_dim" in block_max_triton.unsupported_reason(q, k=k, block_k=16)
    q, k = torch.zeros(1, 2, 3, 16), torch.zeros(1, 1, 10, 16)
    assert "block_k" in block_max_triton.unsupported_reason(q, k=k, block_k=24)
    assert "keys" in block_max_triton.unsupported_reason(q, k=k.double(), block_k=16)


@pytest.mark.gpu
@pytest.mark.parametrize("q_dtype, k_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_kernel_matches_reference_on_gpu(q_dtype, k_dtype):
    from sparse_attn.ops.block_max import triton as block_max_triton

    q, k, _ = random_qkv(1, 32, 8, 64, 16384, 128, dtype=torch.bfloat16, device="cuda", seed=5)
    q = (q.float() * 0.3).to(q_dtype)
    positions = torch.arange(64, device="cuda") * 256 + 255
    key_bias = torch.randn(1, 32, 16384, device="cuda")
    expected = block_max_naive.block_max_logits(q, k, block_k=128, q_positions=positions, key_bias=key_bias)
    got = block_max_triton.block_max_logits_triton(q, k, block_k=128, q_positions=positions, key_bias=key_bias)
    assert torch.equal(got == float("-inf"), expected == float("-inf"))
    finite = expected.isfinite()
    assert torch.allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-3)
