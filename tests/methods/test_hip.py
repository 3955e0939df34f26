"""HiP: the pattern against a row-by-row float64 tree search of the paper's rule, planted structure,
monotone budget, chunking, valid patterns on any shape, config errors."""

from __future__ import annotations

import pytest
import torch
from helpers import naive_attention, random_qkv, relative_error
from planted import PlantedSpec, needle_blocks, planted_qkv

import sparse_attn as sa
from sparse_attn.geometry import num_blocks, own_kv_block_span
from sparse_attn.ops import to_pattern
from sparse_attn.ops.static_masks import sink_local_block_mask


def tree_search(score, candidates: list[int], keep: int) -> set[int]:
    """HiP's search over ``candidates`` (KV blocks in order) with ``score(block)``: 2k chunks, keep k, halve."""
    n = len(candidates)
    chunks = [((c * n) // (2 * keep), ((c + 1) * n) // (2 * keep)) for c in range(2 * keep)]
    while True:
        scored = [
            (score(candidates[lo + (hi - lo) // 2]) if hi > lo else float("-inf"), index)
            for index, (lo, hi) in enumerate(chunks)
        ]
        best = sorted(scored, key=lambda item: (-item[0], item[1]))[:keep]
        kept = [chunks[index] for value, index in sorted(best, key=lambda item: item[1]) if value > float("-inf")]
        if all(hi - lo <= 1 for lo, hi in kept):
            return {candidates[lo] for lo, hi in kept if hi > lo}
        chunks = [part for lo, hi in kept for part in ((lo, (lo + hi + 1) // 2), ((lo + hi + 1) // 2, hi))]


def hip_reference(q, k, *, top_k_tokens, sink_tokens, window_tokens, block_q, block_k, causal):
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    group = q_heads // k.shape[1]
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    keep = num_blocks(top_k_tokens, block_k)
    first, last = own_kv_block_span(seq_q, seq_k, block_q, block_k)
    mask = torch.zeros(batch, q_heads, n_q, n_kv, dtype=torch.bool)
    for b in range(batch):
        for h in range(q_heads):
            keys = k[b, h // group].double()
            for i in range(n_q):
                rows = q[b, h, i * block_q : (i + 1) * block_q].double()
                own = range(int(first[i]), int(last[i]) + 1)
                candidates = [j for j in range(n_kv) if (j < own.start if causal else j not in own)]

                def score(j, rows=rows, keys=keys):
                    return float((rows @ keys[j * block_k : (j + 1) * block_k].T).max())

                for j in tree_search(score, candidates, keep):
                    mask[b, h, i, j] = True
    window = sink_local_block_mask(
        seq_q,
        seq_k,
        block_q,
        block_k,
        sink_blocks=num_blocks(sink_tokens, block_k),
        local_blocks=num_blocks(window_tokens, block_k),
        causal=causal,
    )
    return sa.BlockSparsePattern.from_mask(
        mask | window, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, top_k_tokens",
    [
        (2, 4, 1, 150, 150, 16, 8, 8, 16),
        (1, 12, 4, 60, 203, 32, 16, 8, 24),
        (1, 6, 3, 97, 97, 64, 8, 16, 32),
        (1, 2, 2, 70, 70, 16, 8, 8, 200),
    ],
)
@pytest.mark.parametrize("causal", [True, False])
def test_pattern_equals_the_row_by_row_tree_search(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k, top_k_tokens, causal
):
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_k)
    options = dict(top_k_tokens=top_k_tokens, sink_tokens=8, window_tokens=8, block_q=block_q, block_k=block_k)
    pattern = sa.estimate(q, k, "hip", causal=causal, **options)
    expected = hip_reference(q, k, causal=causal, **options)
    assert torch.equal(pattern.to_mask(), expected.to_mask())
    pattern.validate(causal=causal)


def test_planted_needles_are_found_at_low_density():
    # A needle fills a whole key block, so the chunk holding it scores high at every level of the
    # search. (The planted 4-key column does not: a chunk is judged by its centre block only, so
    # a narrow column inside a wide chunk can be missed, which HiP's attention-locality premise
    # accepts.)
    spec = PlantedSpec(needle_shared_by_group=True)
    q, k, _ = planted_qkv(spec)
    pattern = sa.estimate(q, k, "hip", block_q=16, block_k=16, top_k_tokens=64, sink_tokens=16, window_tokens=16)
    kept = pattern.to_mask()[0]
    for head, (q_block, kv_block) in enumerate(needle_blocks(spec)):
        assert bool(kept[head, q_block, kv_block])
    assert pattern.density() < 0.35
    assert sa.metrics.recall(q, k, pattern) > 0.8


def test_density_grows_with_the_budget_and_chunking_changes_nothing(monkeypatch):
    q, k, _ = random_qkv(2, 4, 2, 120, 160, 32, seed=7)
    densities = [
        sa.estimate(q, k, "hip", block_q=8, block_k=8, top_k_tokens=tokens).density() for tokens in (8, 32, 64, 1000)
    ]
    assert densities == sorted(densities) and densities[-1] == 1.0
    whole = sa.estimate(q, k, "hip", block_q=8, block_k=8, top_k_tokens=24)
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    assert torch.equal(sa.estimate(q, k, "hip", block_q=8, block_k=8, top_k_tokens=24).to_mask(), whole.to_mask())


def test_sparse_attention_with_hip_matches_the_oracle():
    q, k, v = random_qkv(1, 4, 2, 64, 96, 32, seed=2)
    out, info = sa.sparse_attention(q, k, v, method="hip", block_q=16, block_k=16, return_info=True)
    expected, _ = naive_attention(q, k, v, info.pattern, causal=True)
    assert relative_error(out, expected) < 1e-4


@pytest.mark.parametrize(
    "field, value, error",
    [("top_k_tokens", 0, ValueError), ("sink_tokens", -1, ValueError), ("window_tokens", 1.0, TypeError)],
)
def test_config_validation_names_the_field(field, value, error):
    with pytest.raises(error, match=field):
        sa.get_method("hip").make_config(**{field: value})
