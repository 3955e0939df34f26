"""Token layouts: the tile permutation round-trips exactly and makes tiles contiguous."""

from __future__ import annotations

import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.layouts import Layout, default_tile

CASES = [
    ((37,), (8,), 0, "after"),
    ((5, 7), (2, 3), 0, "after"),
    ((6, 9), (3, 3), 5, "before"),
    ((3, 5, 7), (2, 2, 4), 4, "after"),
    ((4, 8, 8), (2, 4, 4), 3, "before"),
    ((2, 3, 5), None, 2, "after"),
]


@pytest.mark.parametrize("grid, tile, text, position", CASES)
def test_permutation_round_trips_exactly(grid, tile, text, position):
    layout = Layout(grid, tile=tile, text_tokens=text, text_position=position)
    x = torch.randn(2, 3, layout.seq_len, 5)
    permuted = layout.permute(x)
    assert torch.equal(layout.unpermute(permuted), x)
    assert torch.equal(layout.permute(layout.unpermute(x)), x)
    lse = torch.randn(2, 3, layout.seq_len)
    assert torch.equal(layout.unpermute(layout.permute(lse)), lse)
    order = layout.order()
    assert torch.equal(torch.sort(order).values, torch.arange(layout.seq_len))
    assert torch.equal(order[layout.inverse()], torch.arange(layout.seq_len))


@pytest.mark.parametrize("grid, tile, text, position", CASES)
def test_tiles_are_contiguous_in_raster_order_and_text_stays(grid, tile, text, position):
    layout = Layout(grid, tile=tile, text_tokens=text, text_position=position)
    coords = layout.coordinates()  # (rank, S) at permuted positions
    start = layout.grid_start
    grid_coords = coords[:, start : start + layout.grid_tokens]
    assert bool((coords[:, :start] == -1).all()) and bool((coords[:, start + layout.grid_tokens :] == -1).all())
    # Text tokens are not moved.
    text_positions = torch.nonzero(layout.is_text(torch.arange(layout.seq_len))).flatten()
    assert torch.equal(layout.order()[text_positions], text_positions)
    # The original position of each permuted grid token matches its coordinates (raster order).
    strides = [math.prod(layout.grid[d + 1 :]) for d in range(layout.rank)]
    raster = sum(grid_coords[d] * strides[d] for d in range(layout.rank)) + start
    assert torch.equal(layout.order()[start : start + layout.grid_tokens], raster)
    # Each tile is one contiguous run, tiles in raster order of the tile grid, tokens in raster order inside.
    tile_ids = torch.zeros_like(grid_coords[0])
    for d in range(layout.rank):
        tile_ids = tile_ids * layout.tile_grid[d] + grid_coords[d] // layout.tile[d]
    changes = int((tile_ids[1:] != tile_ids[:-1]).sum())
    assert changes == math.prod(layout.tile_grid) - 1
    assert bool((tile_ids[1:] >= tile_ids[:-1]).all())
    same_tile = tile_ids[1:] == tile_ids[:-1]
    assert bool((raster[1:] > raster[:-1])[same_tile].all())


def test_whole_tiles_of_block_size_align_with_blocks():
    layout = Layout((4, 16, 16), tile=default_tile(3))
    coords = layout.coordinates().view(3, -1, 128)  # one 128-token block per tile
    for d, t in enumerate(layout.tile):
        extent = coords[d].amax(-1) - coords[d].amin(-1) + 1
        assert bool((extent == t).all())


def test_identity_layouts_and_lazy_public_module():
    assert Layout((3, 4, 5), tile=(1, 4, 5)).is_identity
    assert Layout((3, 4, 5)).is_identity
    assert not Layout((3, 4, 5), tile=(1, 2, 5)).is_identity
    assert sa.layouts.Layout is Layout


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"grid": (3, 0)}, ValueError, "grid"),
        ({"grid": (2, 2, 2, 2)}, ValueError, "grid"),
        ({"grid": "3x4"}, TypeError, "grid"),
        ({"grid": (3, 4), "tile": (2, 2, 2)}, ValueError, "tile"),
        ({"grid": (3, 4), "text_tokens": -1}, ValueError, "text_tokens"),
        ({"grid": (3, 4), "text_position": "middle"}, ValueError, "text_position"),
    ],
)
def test_bad_layouts_raise_naming_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        Layout(**kwargs)


def test_permute_checks_the_length():
    with pytest.raises(ValueError, match="grid=\\(3, 4\\), product 12"):
        Layout((3, 4)).permute(torch.randn(1, 1, 13, 2))
