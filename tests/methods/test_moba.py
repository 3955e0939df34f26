"""MoBA: the pattern against a token-by-token reference of the paper's rule, dense equality, gradients, config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparse_attn as sa
from sparse_attn.cli import main

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_size, top_k): odd lengths, GQA 1-8,
# 12 heads, batch > 1, Sq < Sk, partial last blocks, top_k = 1 and top_k beyond the blocks.
SHAPES = [
    (1, 4, 4, 37, 37, 16, 8, 3),
    (2, 12, 4, 29, 45, 16, 7, 2),
    (2, 8, 1, 33, 33, 8, 5, 4),
    (1, 6, 3, 1, 23, 16, 4, 3),
    (3, 2, 2, 19, 50, 8, 16, 1),
    (1, 8, 2, 21, 21, 16, 3, 100),
]


def reference_blocks(q, k, block_size: int, top_k: int, causal: bool, share_in_group: bool = False) -> list:
    """Per (batch, query head, query token) the set of selected key blocks, one token at a time;
    with ``share_in_group`` per (batch, KV head, query token), scored by the group's summed query."""
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if share_in_group:
        q = q.double().unflatten(1, (kv_heads, q.shape[1] // kv_heads)).sum(2)
    batch, q_heads, seq_q, _ = q.shape
    n_blocks = -(-seq_k // block_size)
    selected = []
    for b in range(batch):
        for h in range(q_heads):
            keys = k[b, h // (q_heads // kv_heads)].double()
            means = [keys[j * block_size : (j + 1) * block_size].mean(0) for j in range(n_blocks)]
            for i in range(seq_q):
                own = (seq_k - seq_q + i) // block_size
                candidates = [j for j in range(n_blocks) if (j < own if causal else j != own)]
                scores = {j: float(q[b, h, i].double() @ means[j]) for j in candidates}
                best = sorted(candidates, key=lambda j: -scores[j])[: top_k - 1]
                selected.append(sorted({own, *best}))
    return selected


def pattern_blocks(pattern) -> list:
    counts, indices = pattern.kv_counts.flatten(0, 2), pattern.kv_indices.flatten(0, 2)
    return [row[:count].tolist() for row, count in zip(indices, counts.tolist(), strict=True)]


@pytest.mark.parametrize("share_in_group", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_pattern_matches_token_level_reference(shape, causal, share_in_group):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_size, top_k = shape
    generator = torch.Generator().manual_seed(sum(shape) + causal)
    q = torch.randn(batch, q_heads, seq_q, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    options = dict(block_size=block_size, top_k=top_k, share_in_group=share_in_group)
    pattern = sa.estimate(q, k, "moba", causal=causal, **options)
    assert (pattern.block_q, pattern.block_k, pattern.seq_q, pattern.seq_k) == (1, block_size, seq_q, seq_k)
    assert pattern.kv_counts.dtype == torch.int32 and pattern.kv_indices.dtype == torch.int32
    assert pattern.kv_counts.shape == (batch, kv_heads if share_in_group else q_heads, seq_q)
    assert pattern_blocks(pattern) == reference_blocks(q, k, block_size, top_k, causal, share_in_group)
    pattern.validate(causal=causal)


def test_api_block_sizes_do_not_change_the_pattern():
    q, k = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16)
    default = sa.estimate(q, k, "moba", block_size=8, top_k=2)
    other = sa.estimate(q, k, "moba", block_size=8, top_k=2, block_q=16, block_k=32)
    assert other.block_q == 1 and other.block_k == 8
    assert torch.equal(default.kv_counts, other.kv_counts) and torch.equal(default.kv_indices, other.kv_indices)


def dense_causal(q, k, v):
    """SDPA on GQA-expanded k/v with the queries at the last Sq positions."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    visible = torch.arange(seq_k)[None, :] <= torch.arange(seq_q)[:, None] + (seq_k - seq_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


@pytest.mark.parametrize("shape", [(2, 12, 4, 29, 45, 16, 7), (1, 8, 1, 33, 33, 32, 5), (1, 4, 2, 1, 30, 16, 4)])
def test_top_k_covering_every_block_is_dense_causal_attention(shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_size = shape
    generator = torch.Generator().manual_seed(sum(shape))
    q = torch.randn(batch, q_heads, seq_q, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq_k, dim, generator=generator)
    top_k = -(-seq_k // block_size)
    out = sa.sparse_attention(q, k, v, method="moba", block_size=block_size, top_k=top_k, backend="reference")
    torch.testing.assert_close(out, dense_causal(q, k, v), atol=1e-4, rtol=1e-4)


def test_gradients_flow_to_q_k_v():
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 25, 16, generator=generator, requires_grad=True)
    k = torch.randn(2, 2, 31, 16, generator=generator, requires_grad=True)
    v = torch.randn(2, 2, 31, 16, generator=generator, requires_grad=True)
    out = sa.sparse_attention(q, k, v, method="moba", block_size=6, top_k=2, backend="reference")
    out.square().sum().backward()
    for tensor in (q, k, v):
        assert tensor.grad is not None and torch.isfinite(tensor.grad).all() and tensor.grad.abs().sum() > 0


@pytest.mark.parametrize(("field", "value", "error"), [("block_size", 0, ValueError), ("top_k", 0, ValueError)])
def test_config_errors_name_the_field(field, value, error):
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(error, match=field):
        sa.estimate(q, k, "moba", **{field: value})
    with pytest.raises(TypeError, match=field):
        sa.estimate(q, k, "moba", **{field: 2.5})


def test_listed_with_paper_and_defaults(capsys):
    method = sa.get_method("moba")
    assert method in sa.list_methods()
    assert method.defaults() == {"block_size": 4096, "top_k": 12, "share_in_group": False}
    assert main(["methods"]) == 0
    printed = capsys.readouterr().out
    assert "moba" in printed and "arXiv:2502.13189" in printed and "block_size=4096" in printed


def test_share_in_group_must_be_a_bool():
    q, k = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    with pytest.raises(TypeError, match="share_in_group"):
        sa.estimate(q, k, "moba", share_in_group=1)
