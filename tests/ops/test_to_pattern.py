"""Pattern assembly: the streaming builder against ``BlockSparsePattern.from_mask``; the row geometry it uses."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from sparse_attn.geometry import causal_block_mask, diagonal_block_mask, num_blocks
from sparse_attn.ops import to_pattern
from sparse_attn.ops.block_rows import (
    causal_block_rows,
    causal_block_rows_at,
    diagonal_block_rows,
    diagonal_block_rows_at,
    query_block_chunks,
    query_block_index,
    query_block_rows,
)
from sparse_attn.ops.to_pattern import PatternBuilder
from sparse_attn.pattern import BlockSparsePattern


def _from_mask(mask, causal, **geometry):
    """The pattern rules as from_mask applies them, plus the non-causal empty-row rule."""
    if not causal:
        empty = ~mask.any(-1, keepdim=True)
        last = torch.zeros_like(mask)
        last[..., -1] = True
        mask = mask | (empty & last)
    return BlockSparsePattern.from_mask(mask.contiguous(), causal=causal, **geometry)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("seq_q, seq_k, block_q, block_k", [(100, 100, 16, 16), (37, 141, 8, 32), (64, 77, 32, 8)])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.6])
@pytest.mark.parametrize("compact", [False, True], ids=["padded", "compact"])
def test_builder_matches_from_mask_in_any_chunking(
    monkeypatch, causal, lead, seq_q, seq_k, block_q, block_k, density, compact
):
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    generator = torch.Generator().manual_seed(seq_q + len(lead))
    mask = torch.rand(*lead, n_q, n_kv, generator=generator) < density
    geometry = dict(seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k)
    expected = _from_mask(mask, causal, **geometry)
    full = mask.expand(*expected.kv_counts.shape[:2], n_q, n_kv)
    batch, heads = expected.kv_counts.shape[:2]
    # Rows in chunks of every size, added in shuffled order, heads in two parts; pieces of one row.
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    for rows_per_chunk in range(1, n_q + 1):
        builder = PatternBuilder(batch=batch, heads=heads, causal=causal, compact=compact, **geometry)
        chunks = query_block_chunks(n_q, rows_per_chunk)
        random.Random(rows_per_chunk).shuffle(chunks)
        split = max(1, heads // 2)
        for rows, part in itertools.product(chunks, [range(split), range(split, heads)]):
            if len(part):
                builder.add(full[:, part.start : part.stop, rows.start : rows.stop], rows=rows, heads=part)
        got = builder.finish()
        assert torch.equal(got.kv_counts, expected.kv_counts)
        assert torch.equal(got.kv_indices, expected.kv_indices)
        assert got.max_kv == max(1, int(got.kv_counts.max()))
        got.validate(causal=causal)


def test_builder_broadcasts_a_shared_mask_and_refuses_missing_rows():
    builder = PatternBuilder(batch=2, heads=3, seq_q=40, seq_k=40, block_q=8, block_k=8, causal=True)
    builder.add(torch.ones(5, 5, dtype=torch.bool), rows=range(0, 5))
    pattern = builder.finish()
    assert pattern.kv_counts.shape == (2, 3, 5)
    assert torch.equal(pattern.to_mask(), causal_block_mask(40, 40, 8, 8).expand(2, 3, 5, 5))
    incomplete = PatternBuilder(batch=1, heads=2, seq_q=40, seq_k=40, block_q=8, block_k=8, causal=True)
    incomplete.add(torch.ones(3, 5, dtype=torch.bool), rows=range(2, 5))
    with pytest.raises(RuntimeError, match="rows"):
        incomplete.finish()
    with pytest.raises(TypeError, match="bool"):
        incomplete.add(torch.ones(2, 5), rows=range(0, 2))


@pytest.mark.parametrize("seq_q, extra", [(1, 0), (17, 0), (40, 9), (59, 33)])
@pytest.mark.parametrize("block_q, block_k", [(4, 4), (8, 4), (4, 16)])
def test_block_rows_are_rows_of_the_geometry_tables(seq_q, extra, block_q, block_k):
    seq_k = seq_q + extra
    n_q = num_blocks(seq_q, block_q)
    causal = causal_block_mask(seq_q, seq_k, block_q, block_k)
    diagonal = diagonal_block_mask(seq_q, seq_k, block_q, block_k)
    for size in range(1, n_q + 1):
        chunks = query_block_chunks(n_q, size)
        assert chunks[0].stop == n_q  # last chunk first
        assert sorted(row for rows in chunks for row in rows) == list(range(n_q))
        for rows in chunks:
            assert torch.equal(causal_block_rows(seq_q, seq_k, block_q, block_k, rows), causal[rows.start : rows.stop])
            assert torch.equal(
                diagonal_block_rows(seq_q, seq_k, block_q, block_k, rows), diagonal[rows.start : rows.stop]
            )
    picked = tuple(random.Random(seq_q * 31 + extra).choices(range(n_q), k=5))  # any order, repeats
    assert torch.equal(causal_block_rows_at(seq_q, seq_k, block_q, block_k, picked), causal[list(picked)])
    assert torch.equal(diagonal_block_rows_at(seq_q, seq_k, block_q, block_k, picked), diagonal[list(picked)])
    # The range/tuple functions dispatch a tuple to the _at rule.
    assert torch.equal(causal_block_rows(seq_q, seq_k, block_q, block_k, picked), causal[list(picked)])
    assert torch.equal(diagonal_block_rows(seq_q, seq_k, block_q, block_k, picked), diagonal[list(picked)])


def test_query_block_index_and_rows_along_a_dim():
    assert query_block_index(range(3, 7)).tolist() == [3, 4, 5, 6]
    assert query_block_index((5, 1, 5)).tolist() == [5, 1, 5]
    table = torch.arange(2 * 3 * 6).view(2, 3, 6)
    assert torch.equal(query_block_rows(table, range(2, 5), dim=2), table[:, :, 2:5])
    assert torch.equal(query_block_rows(table, (4, 0), dim=2), table[:, :, [4, 0]])
    assert torch.equal(query_block_rows(table, (1,), dim=1), table[:, [1]])
    with pytest.raises(ValueError, match="q_blocks"):
        query_block_rows(table, (6,), dim=2)
    with pytest.raises(ValueError, match="q_blocks"):
        query_block_rows(table, range(4, 7), dim=2)


def test_rows_multiple_gives_chunks_of_whole_groups(monkeypatch):
    seen = []

    def mask_rows(rows: range) -> torch.Tensor:
        seen.append(rows)
        return torch.ones(len(rows), 5, dtype=torch.bool)

    geometry = dict(batch=1, heads=1, seq_q=80, seq_k=80, block_q=8, block_k=16, causal=True, device="cpu")
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    to_pattern.stream_pattern(mask_rows, row_elements=1, rows_multiple=3, **geometry)
    assert sorted((r.start, r.stop) for r in seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    seen.clear()
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 7)
    to_pattern.stream_pattern(mask_rows, row_elements=1, rows_multiple=3, **geometry)
    assert sorted((r.start, r.stop) for r in seen) == [(0, 6), (6, 10)]


def test_capture_rows_rejects_blocks_outside_the_pattern():
    import sparse_attn as sa
    from sparse_attn.ops.to_pattern import capture_rows

    q, k = torch.randn(1, 2, 64, 16), torch.randn(1, 1, 64, 16)
    with pytest.raises(ValueError, match="query_blocks"):
        with capture_rows([]):
            pass
    with capture_rows([9]), pytest.raises(ValueError, match="query block 9"):
        sa.estimate(q, k, "block_topk", block_q=16, block_k=16)


def test_capture_rows_gives_the_captured_rows_or_a_static_rules_whole_pattern(monkeypatch):
    """In several chunks, a rule that reads scores is called on the captured blocks only and its rows
    raise RowsCaptured (row rules applied); a static rule builds and returns its whole pattern."""
    from sparse_attn.ops.to_pattern import RowsCaptured, capture_rows

    n_q, n_kv = 10, 5
    table = torch.rand(2, 3, n_q, n_kv, generator=torch.Generator().manual_seed(3)) < 0.4
    seen = []

    def mask_rows(rows: range) -> torch.Tensor:
        seen.append(rows)
        return table[:, :, rows.start : rows.stop]

    geometry = dict(batch=2, heads=3, seq_q=80, seq_k=80, block_q=8, block_k=16, causal=True, device="cpu")
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    whole = to_pattern.stream_pattern(mask_rows, row_elements=1, **geometry)
    blocks = (7, 2, 9)
    seen.clear()
    with capture_rows(blocks), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, **geometry)
    assert sorted(rows.start for rows in seen) == sorted(blocks)
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, list(blocks)])
    seen.clear()
    with capture_rows(blocks):
        static = to_pattern.stream_pattern(mask_rows, row_elements=1, static=True, **geometry)
    assert len(seen) == n_q and torch.equal(static.to_mask(), whole.to_mask())


def test_block_lists_rule_is_called_once_per_chunk_of_captured_blocks(monkeypatch):
    from sparse_attn.ops.to_pattern import RowsCaptured, capture_rows

    table = torch.rand(1, 2, 10, 5, generator=torch.Generator().manual_seed(4)) < 0.5
    seen = []

    def mask_rows(rows) -> torch.Tensor:
        seen.append(rows)
        return query_block_rows(table, rows, dim=2)

    geometry = dict(batch=1, heads=2, seq_q=80, seq_k=80, block_q=8, block_k=16, causal=True, device="cpu")
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    whole = to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, **geometry)
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 9)  # chunks of 9 query blocks (of 10)
    seen.clear()
    with capture_rows((8, 1, 5)), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, **geometry)
    assert seen == [(8, 1, 5)]
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, [8, 1, 5]])
    # Groups of 3 blocks: the whole groups holding the captured blocks, ascending, a chunk's worth a call.
    seen.clear()
    with capture_rows((8, 1, 5, 9)), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, rows_multiple=3, **geometry)
    assert seen == [(0, 1, 2, 3, 4, 5, 6, 7, 8), (9,)]
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, [8, 1, 5, 9]])
    seen.clear()
    with capture_rows((9, 4)), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, rows_multiple=3, **geometry)
    assert seen == [(3, 4, 5, 9)]
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, [9, 4]])
    # Calls hold at most a chunk's blocks (here 6, two groups): whole groups, never split.
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 6)
    seen.clear()
    with capture_rows((8, 1, 5, 9)), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, rows_multiple=3, **geometry)
    assert seen == [(0, 1, 2, 3, 4, 5), (6, 7, 8, 9)]
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, [8, 1, 5, 9]])
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 2)
    seen.clear()
    with capture_rows((8, 1, 5)), pytest.raises(RowsCaptured) as captured:
        to_pattern.stream_pattern(mask_rows, row_elements=1, block_lists=True, **geometry)
    assert seen == [(8, 1), (5,)]
    assert torch.equal(captured.value.mask, whole.to_mask()[:, :, [8, 1, 5]])
