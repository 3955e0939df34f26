"""Vertical-slash -> blocks operator: against token-level lines; head chunking."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.geometry import num_blocks
from sparse_attn.ops.vertical_slash_blocks import naive as vertical_slash_naive
from sparse_attn.ops.vertical_slash_blocks import vertical_slash_block_mask


@pytest.mark.parametrize("seq_q, seq_k, block_q, block_k", [(40, 40, 8, 8), (30, 70, 8, 16), (33, 50, 16, 8)])
def test_vertical_slash_block_mask_matches_token_level_lines(seq_q, seq_k, block_q, block_k):
    generator = torch.Generator().manual_seed(seq_q)
    vertical = torch.rand(1, 1, seq_k, generator=generator) < 0.05
    slash = torch.rand(1, 1, seq_k, generator=generator) < 0.05
    got = vertical_slash_block_mask(vertical, slash, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k)[0, 0]
    positions = torch.arange(seq_q) + seq_k - seq_q
    keys = torch.arange(seq_k)
    distance = positions[:, None] - keys[None, :]
    visible = distance >= 0
    on_line = vertical[0, 0][None, :] | slash[0, 0][distance.clamp(min=0)]
    tokens = (on_line & visible).float()
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    padded = torch.nn.functional.pad(tokens, (0, n_kv * block_k - seq_k, 0, n_q * block_q - seq_q))
    expected = padded.view(n_q, block_q, n_kv, block_k).sum((1, 3)) > 0
    assert torch.equal(got, expected)


def test_vertical_slash_block_mask_in_head_chunks_matches_whole(monkeypatch):
    generator = torch.Generator().manual_seed(1)
    vertical = torch.rand(2, 5, 300, generator=generator) < 0.03
    slash = torch.rand(2, 5, 300, generator=generator) < 0.03
    whole = vertical_slash_block_mask(vertical, slash, seq_q=260, seq_k=300, block_q=16, block_k=32)
    monkeypatch.setattr(vertical_slash_naive, "CHUNK_ELEMENTS", 8 * 2 * 17 * 10 * 2)  # two heads per chunk
    chunked = vertical_slash_block_mask(vertical, slash, seq_q=260, seq_k=300, block_q=16, block_k=32)
    assert torch.equal(chunked, whole)


def test_vertical_slash_block_mask_query_block_ranges_are_rows_of_the_whole(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    vertical = torch.rand(2, 3, 300, generator=generator) < 0.03
    slash = torch.rand(2, 3, 300, generator=generator) < 0.03
    geometry = dict(seq_q=260, seq_k=300, block_q=16, block_k=32)
    for causal in (True, False):
        whole = vertical_slash_block_mask(vertical, slash, **geometry, causal=causal)
        for start, stop in [(0, 1), (3, 17), (16, 17)]:
            part = vertical_slash_block_mask(vertical, slash, **geometry, causal=causal, q_blocks=range(start, stop))
            assert torch.equal(part, whole[:, :, start:stop])
    # Pieces of one head and two query blocks.
    monkeypatch.setattr(vertical_slash_naive, "CHUNK_ELEMENTS", 8 * 2 * 2 * 10)
    pieces = vertical_slash_block_mask(vertical, slash, **geometry, q_blocks=range(3, 17))
    assert torch.equal(pieces, vertical_slash_block_mask(vertical, slash, **geometry)[:, :, 3:17])
