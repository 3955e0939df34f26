"""Static block masks operator: the sink + local window contract and its validation."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.ops.static_masks import sink_local_block_mask


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
