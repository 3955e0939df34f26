"""The exact dense attention a patched model runs for dense and sliding-window layers."""

from __future__ import annotations

import torch

from sparse_attn.backends.dense import causal_attention, sliding_window_attention


def test_sliding_window_and_causal_attention_match_masked_sdpa():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, 8, generator=generator)
    k, v = (torch.randn(2, 2, 70, 8, generator=generator) for _ in range(2))
    position_q = torch.arange(20, 70)[:, None]
    position_k = torch.arange(70)[None, :]
    visible = (position_k <= position_q) & (position_k > position_q - 9)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=visible, scale=0.3
    )
    got = sliding_window_attention(q, k, v, window=9, scale=0.3, chunk=16)
    assert float((got - expected).abs().max()) <= 1e-5
    causal = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=position_k <= position_q, scale=0.3
    )
    assert float((causal_attention(q, k, v, scale=0.3) - causal).abs().max()) <= 1e-5
