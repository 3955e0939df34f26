"""Last-query probe operator: vertical, slash and block sums against brute force; head chunking."""

from __future__ import annotations

import torch
from helpers import random_qkv

from sparse_attn.ops.last_query_probe import naive as probe_naive
from sparse_attn.ops.last_query_probe import probe_last_queries


def test_probe_sums_match_brute_force():
    q, k, _ = random_qkv(1, 4, 2, 24, 40, 16, seed=4)
    scale = 0.25
    sums = probe_last_queries(q, k, num_queries=8, block_k=16, scale=scale, causal=True)
    group = 2
    logits = (q[:, :, -8:] @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    positions = torch.arange(32, 40)
    keys = torch.arange(40)
    logits = logits.masked_fill(keys[None, :] > positions[:, None], float("-inf"))
    probs = torch.softmax(logits, -1)
    expected_slash = torch.zeros(1, 4, 40)
    for row, position in enumerate(positions.tolist()):
        for key in range(position + 1):
            expected_slash[..., position - key] += probs[..., row, key]
    assert torch.allclose(sums.vertical, probs.sum(-2), atol=1e-6)
    assert torch.allclose(sums.slash, expected_slash, atol=1e-6)
    expected_block = torch.stack([probs.sum(-2)[..., start : start + 16].sum(-1) for start in (0, 16, 32)], -1)
    assert torch.allclose(sums.block, expected_block, atol=1e-6)


def test_probe_chunking_within_a_gqa_group_matches_unchunked(monkeypatch):
    q, k, _ = random_qkv(1, 8, 2, 40, 70, 16, seed=7)
    whole = probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    monkeypatch.setattr(probe_naive, "CHUNK_ELEMENTS", 64)  # one query head per chunk
    chunked = probe_last_queries(q, k, num_queries=8, block_k=16, scale=0.25, causal=True)
    assert torch.allclose(whole.vertical, chunked.vertical) and torch.allclose(whole.slash, chunked.slash)
