"""BlockSparsePattern: construction, conversions, and validate() catching each malformed case."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.geometry import causal_block_mask, diagonal_block_mask
from sparse_attn.pattern import BlockSparsePattern
from sparse_attn.plan import plan_for


def _pattern(counts, indices, *, seq_q=64, seq_k=64, block=16):
    return BlockSparsePattern(
        kv_counts=torch.tensor(counts, dtype=torch.int32).reshape(1, 1, -1),
        kv_indices=torch.tensor(indices, dtype=torch.int32).reshape(1, 1, len(counts), -1),
        block_q=block,
        block_k=block,
        seq_q=seq_q,
        seq_k=seq_k,
    )


def test_causal_geometry_with_queries_at_the_end():
    # 40 queries at positions 60..99 of 100 keys, blocks of 16: query blocks start at 60, 76, 92.
    valid = causal_block_mask(40, 100, 16, 16)
    diagonal = diagonal_block_mask(40, 100, 16, 16)
    assert valid.shape == (3, 7)
    assert valid.sum(-1).tolist() == [5, 6, 7]  # last positions 75, 91, 99
    assert diagonal.nonzero().tolist() == [[0, 3], [0, 4], [1, 4], [1, 5], [2, 5], [2, 6]]


def test_valid_hand_built_pattern_passes():
    pattern = _pattern([1, 2, 2, 3], [[0, 0, 0], [0, 1, 0], [0, 2, 0], [0, 2, 3]])
    assert pattern.validate(causal=True) is pattern
    assert pattern.density() == pytest.approx(8 / 10)


@pytest.mark.parametrize(
    "counts, indices, message",
    [
        ([1, 0, 1, 1], [[0, 0], [1, 0], [2, 0], [3, 0]], "kv_counts must be in"),
        ([1, 3, 1, 1], [[0, 0], [0, 1], [2, 0], [3, 0]], "kv_counts must be in"),
        ([1, 2, 1, 1], [[0, 0], [0, 9], [2, 0], [3, 0]], "outside"),
        ([1, 2, 1, 1], [[0, 0], [-1, 1], [2, 0], [3, 0]], "outside"),
        ([1, 2, 1, 2], [[0, 0], [1, 0], [2, 0], [3, 3]], "strictly increasing"),
        ([1, 2, 1, 2], [[0, 0], [1, 1], [2, 0], [0, 3]], "strictly increasing"),
        ([2, 2, 1, 1], [[0, 1], [0, 1], [2, 0], [3, 0]], "not causal"),
        ([1, 1, 1, 1], [[0, 0], [0, 0], [2, 0], [3, 0]], "diagonal"),
    ],
    ids=["zero-count", "count>max", "index-too-big", "negative-index", "repeat", "unsorted", "acausal", "no-diagonal"],
)
def test_validate_rejects_each_malformed_case(counts, indices, message):
    pattern = _pattern(counts, indices)
    with pytest.raises(ValueError, match=message):
        pattern.validate(causal=True)


def test_acausal_pattern_is_fine_without_causality():
    pattern = _pattern([2, 2, 1, 1], [[0, 1], [0, 1], [2, 0], [3, 0]])
    pattern.validate(causal=False)
    with pytest.raises(ValueError, match="not causal"):
        pattern.validate(causal=True)


def test_backend_validates_a_pattern_before_first_use():
    q = torch.randn(1, 1, 64, 64)
    pattern = _pattern([1, 1, 1, 1], [[0], [0], [2], [3]])
    with pytest.raises(ValueError, match="diagonal"):
        sa.block_sparse_attention(q, q, q, pattern, backend="reference")


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(kv_counts=torch.ones(1, 1, 4)), TypeError, "int32"),
        (dict(kv_counts=torch.ones(1, 4, dtype=torch.int32)), ValueError, "kv_counts must have shape"),
        (dict(kv_indices=torch.zeros(1, 1, 3, 1, dtype=torch.int32)), ValueError, "kv_indices must have shape"),
        (
            dict(
                kv_counts=torch.ones(1, 1, 3, dtype=torch.int32), kv_indices=torch.zeros(1, 1, 3, 1, dtype=torch.int32)
            ),
            ValueError,
            "needs 4",
        ),
        (dict(block_q=0), ValueError, "block_q"),
        (dict(seq_q=65), ValueError, "seq_k must be >= seq_q"),
        (dict(seq_k=0), ValueError, "seq_k"),
    ],
)
def test_constructor_rejects_bad_fields(kwargs, error, message):
    fields = dict(
        kv_counts=torch.ones(1, 1, 4, dtype=torch.int32),
        kv_indices=torch.zeros(1, 1, 4, 1, dtype=torch.int32),
        block_q=16,
        block_k=16,
        seq_q=64,
        seq_k=64,
    )
    fields.update(kwargs)
    with pytest.raises(error, match=message):
        BlockSparsePattern(**fields)


@pytest.mark.parametrize("seq_q, seq_k, block_q, block_k", [(64, 64, 16, 16), (50, 90, 16, 32), (77, 77, 32, 16)])
@pytest.mark.parametrize("causal", [True, False])
def test_mask_round_trip(seq_q, seq_k, block_q, block_k, causal):
    pattern = sa.random_pattern(
        batch=2, heads=3, seq_q=seq_q, seq_k=seq_k, density=0.4, block_q=block_q, block_k=block_k, causal=causal, seed=2
    )
    pattern.validate(causal=causal)
    mask = pattern.to_mask()
    assert mask.shape == (2, 3, pattern.num_q_blocks, pattern.num_kv_blocks)
    again = BlockSparsePattern.from_mask(
        mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )
    assert torch.equal(again.to_mask(), mask)
    assert again.density(causal=causal) == pytest.approx(pattern.density(causal=causal))


def test_from_mask_enforces_causality_and_diagonal():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, 3] = True  # a future block
    pattern = BlockSparsePattern.from_mask(mask, block_q=16, block_k=16, seq_q=64, seq_k=64)
    assert torch.equal(pattern.to_mask()[0, 0], torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no KV block"):
        BlockSparsePattern.from_mask(mask, block_q=16, block_k=16, seq_q=64, seq_k=64, causal=False)
    with pytest.raises(TypeError, match="bool"):
        BlockSparsePattern.from_mask(mask.int(), block_q=16, block_k=16, seq_q=64, seq_k=64)
    with pytest.raises(ValueError, match="n_q_blocks"):
        BlockSparsePattern.from_mask(mask, block_q=16, block_k=16, seq_q=80, seq_k=80)


def test_density_of_dense_and_diagonal_patterns():
    assert sa.dense_pattern(seq_q=100, block_q=16, block_k=16).density() == 1.0
    diagonal_only = BlockSparsePattern.from_mask(
        torch.zeros(8, 8, dtype=torch.bool), block_q=16, block_k=16, seq_q=128, seq_k=128
    )
    assert diagonal_only.density() == pytest.approx(8 / 36)


def test_union_broadcasts_and_checks_geometry():
    a = sa.random_pattern(batch=1, heads=2, seq_q=64, density=0.3, block_q=16, block_k=16, seed=1)
    b = sa.random_pattern(batch=2, heads=2, seq_q=64, density=0.3, block_q=16, block_k=16, seed=2)
    both = a.union(b)
    assert torch.equal(both.to_mask(), a.to_mask() | b.to_mask())
    both.validate()
    with pytest.raises(ValueError, match="share block_q"):
        a.union(sa.dense_pattern(seq_q=64, block_q=32, block_k=32))
    with pytest.raises(TypeError):
        a.union("dense")


def test_to_device_keeps_contents_and_expand_heads_repeats_groups():
    pattern = sa.random_pattern(heads=2, seq_q=64, density=0.5, block_q=16, block_k=16, seed=3)
    moved = pattern.to("cpu")
    assert torch.equal(moved.kv_indices, pattern.kv_indices)
    expanded = pattern.expand_heads(6)
    assert expanded.num_heads == 6
    assert torch.equal(expanded.to_mask()[:, 3:6], pattern.to_mask()[:, 1:2].expand(-1, 3, -1, -1))
    with pytest.raises(ValueError, match="cannot expand"):
        pattern.expand_heads(5)


def test_random_pattern_is_seeded_and_near_target_density():
    first = sa.random_pattern(heads=4, seq_q=2048, density=0.2, block_q=64, block_k=64, seed=9)
    second = sa.random_pattern(heads=4, seq_q=2048, density=0.2, block_q=64, block_k=64, seed=9)
    assert torch.equal(first.kv_indices, second.kv_indices)
    assert abs(first.density() - 0.2) < 0.03
    with pytest.raises(ValueError, match="density"):
        sa.random_pattern(seq_q=64, density=1.5)


def test_validation_and_plan_of_a_token_level_pattern_allocate_no_block_table(monkeypatch):
    """block_q = 1 at 64K tokens: a (n_q_blocks, n_kv_blocks) table would be 64K x 1K entries per
    head; validation and the plan work from the lists (a trap makes any table use fail)."""
    import sparse_attn.geometry as geometry
    import sparse_attn.pattern as pattern_module

    def trap(*args, **kwargs):
        raise AssertionError("a (n_q_blocks, n_kv_blocks) table was built")

    for name in ("causal_block_mask", "diagonal_block_mask", "fully_visible_block_mask"):  # and density()
        monkeypatch.setattr(geometry, name, trap)
        monkeypatch.setattr(pattern_module, name, trap, raising=False)
    seq, block_k = 65536, 64
    own = torch.arange(seq, dtype=torch.int32) // block_k
    indices = torch.stack([torch.zeros_like(own), own], -1)[None, None]  # the first block and the own one
    indices[..., :block_k, 1] = 0
    counts = torch.where(own < 1, 1, 2).to(torch.int32)[None, None]
    pattern = BlockSparsePattern(counts, indices.contiguous(), block_q=1, block_k=block_k, seq_q=seq, seq_k=seq)
    pattern.validate(causal=True)
    assert 0 < pattern.density() < 0.01
    plan = plan_for(pattern, causal=True)
    # Block 0 is full for every query past it; a query's own block only at the block's last token.
    assert int(plan.full_counts.sum()) == seq - block_k + seq // block_k
    ones = torch.ones_like(counts)
    broken = BlockSparsePattern(ones, torch.zeros_like(indices), block_q=1, block_k=block_k, seq_q=seq, seq_k=seq)
    with pytest.raises(ValueError, match="diagonal"):
        broken.validate(causal=True)
