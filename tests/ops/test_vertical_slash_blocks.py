"""Vertical-slash -> blocks operator: against token-level lines; head chunking."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.geometry import num_blocks
from sparse_attn.ops.vertical_slash_blocks import naive as vertical_slash_naive
from sparse_attn.ops.vertical_slash_blocks import triton as vertical_slash_triton
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


@pytest.mark.parametrize(
    "batch, heads, seq_q, seq_k, block_q, block_k, q_blocks",
    [
        (1, 1, 40, 40, 8, 8, None),
        (2, 3, 30, 70, 8, 16, None),
        (1, 2, 33, 50, 16, 8, range(1, 3)),
        (2, 1, 260, 300, 16, 32, range(3, 17)),
        (1, 2, 97, 611, 16, 16, None),
    ],
)
@pytest.mark.parametrize("density", [0.03, 0.3])
def test_kernel_equals_reference(batch, heads, seq_q, seq_k, block_q, block_k, q_blocks, density, monkeypatch):
    generator = torch.Generator().manual_seed(seq_k + heads)
    vertical = torch.rand(batch, heads, seq_k, generator=generator) < density
    slash = torch.rand(batch, heads, seq_k, generator=generator) < density
    slash[0, 0] = False  # a head without diagonals
    vertical[-1, -1, :] = False  # and one without columns
    geometry = dict(seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, q_blocks=q_blocks)
    # The kernel's output is poisoned: every entry of the requested rows must be written.
    monkeypatch.setattr(vertical_slash_triton, "_empty", lambda *a, **k: torch.full(*a, 3, **k))
    for causal in (True, False):
        expected = vertical_slash_naive.vertical_slash_block_mask(vertical, slash, **geometry, causal=causal)
        got = vertical_slash_triton.vertical_slash_block_mask_triton(vertical, slash, **geometry, causal=causal)
        assert got.dtype == torch.bool and torch.equal(got.view(torch.int8), expected.view(torch.int8))


def test_kernel_steps_over_many_kv_blocks(monkeypatch):
    # More KV blocks than one step of the kernel holds.
    monkeypatch.setattr(vertical_slash_triton, "_BLOCK_J", 16)
    generator = torch.Generator().manual_seed(5)
    vertical = torch.rand(1, 2, 500, generator=generator) < 0.02
    slash = torch.rand(1, 2, 500, generator=generator) < 0.02
    geometry = dict(seq_q=450, seq_k=500, block_q=8, block_k=8)
    expected = vertical_slash_naive.vertical_slash_block_mask(vertical, slash, **geometry)
    assert torch.equal(vertical_slash_triton.vertical_slash_block_mask_triton(vertical, slash, **geometry), expected)


@pytest.mark.gpu
def test_kernel_equals_reference_on_gpu():
    generator = torch.Generator(device="cuda").manual_seed(0)
    vertical = torch.rand(1, 32, 131072, device="cuda", generator=generator) < 0.001
    slash = torch.rand(1, 32, 131072, device="cuda", generator=generator) < 0.001
    geometry = dict(seq_q=131072, seq_k=131072, block_q=128, block_k=128, q_blocks=range(100, 900))
    expected = vertical_slash_naive.vertical_slash_block_mask(vertical, slash, **geometry)
    assert torch.equal(vertical_slash_block_mask(vertical, slash, **geometry), expected)  # the kernel on CUDA
