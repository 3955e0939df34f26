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
