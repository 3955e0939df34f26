"""Static block masks operator: the sink + local window contract and its validation."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.ops.static_masks import block_distance, sink_local_block_mask


def test_sink_local_block_mask_contract():
    # local_blocks=1 is the diagonal alone; sinks add the first blocks.
    diagonal = sa.BlockSparsePattern.from_mask(
        torch.zeros(7, 7, dtype=torch.bool), block_q=16, block_k=16, seq_q=100, seq_k=100
    ).to_mask()[0, 0]
    assert torch.equal(sink_local_block_mask(100, 100, 16, 16, sink_blocks=0, local_blocks=1), diagonal)
    with_sinks = sink_local_block_mask(100, 100, 16, 16, sink_blocks=2, local_blocks=1)
    assert torch.equal(with_sinks[:, :2], torch.tril(torch.ones(7, 2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="local_blocks"):
        sink_local_block_mask(100, 100, 16, 16, sink_blocks=0, local_blocks=0)
    with pytest.raises(TypeError, match="sink_blocks"):
        sink_local_block_mask(100, 100, 16, 16, sink_blocks=1.0, local_blocks=1)


@pytest.mark.parametrize("causal", [True, False])
def test_static_masks_query_block_ranges_are_rows_of_the_whole(causal):
    geometry = (70, 150, 16, 8)
    whole_distance = block_distance(*geometry)
    whole = sink_local_block_mask(*geometry, sink_blocks=2, local_blocks=3, causal=causal)
    for start, stop in [(0, 1), (1, 5), (4, 5)]:
        rows = range(start, stop)
        assert torch.equal(block_distance(*geometry, q_blocks=rows), whole_distance[start:stop])
        part = sink_local_block_mask(*geometry, sink_blocks=2, local_blocks=3, causal=causal, q_blocks=rows)
        assert torch.equal(part, whole[start:stop])


@pytest.mark.parametrize("causal", [True, False])
def test_rows_of_a_tuple_of_query_blocks_are_rows_of_the_whole(causal):
    """Any query blocks, in any order (capture_rows' tuples): the whole table's rows."""
    picked = (6, 0, 3, 6)
    geometry = (100, 130, 16, 16)
    whole = sink_local_block_mask(*geometry, sink_blocks=1, local_blocks=2, causal=causal)
    part = sink_local_block_mask(*geometry, sink_blocks=1, local_blocks=2, causal=causal, q_blocks=picked)
    assert torch.equal(part, whole[list(picked)])
    distance = block_distance(*geometry)
    assert torch.equal(block_distance(*geometry, q_blocks=picked), distance[list(picked)])
    with pytest.raises(ValueError, match="q_blocks"):
        block_distance(*geometry, q_blocks=(7,))
