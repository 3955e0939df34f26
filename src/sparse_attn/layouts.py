"""Token layouts of image and video transformers: grids, text tokens, and the tile permutation.

A diffusion transformer flattens an image ``(H, W)`` or a video ``(T, H, W)`` latent grid into
one sequence in raster order (last dimension fastest), often beside text tokens that take part
in the same attention (MM-DiT "joint attention": the text before or after the video). A
:class:`Layout` describes that sequence and a *tile permutation* of it: the grid is cut into
tiles (``tile``, one size per dimension) and the sequence reordered tile by tile (tiles in
raster order over the tile grid, tokens in raster order inside each tile). Spatio-temporal
neighbourhoods then become runs of whole tiles, so a block-sparse kernel computes them as
dense blocks; with tiles of ``block`` tokens each block is one tile.

Borders: a tile size need not divide its dimension. The permutation is padding-free: the
last tile along a dimension is cut short (it holds ``size % tile`` positions) and every tile
holds only the grid positions it covers, so the sequence length is unchanged. Tiles then
hold different numbers of tokens, and blocks of a fixed size no longer align with tiles
after the first short tile; methods stay exact through their token rule
(:mod:`sparse_attn.masked_pattern`), and are block-exact (run on the block kernels) where the
tile sizes divide the grid.

Text tokens keep their place: ``text_position="before"`` puts the ``text_tokens`` text tokens
at positions ``[0, text_tokens)`` and the grid after them, ``"after"`` (the default, as
HunyuanVideo and Wan's joint layouts) the grid first. The permutation moves grid tokens only.

Conventions. ``permute`` and ``unpermute`` act on dimension 2 of ``(B, H, S, D)`` tensors
(``(B, H, S)`` works too, e.g. a log-sum-exp; on CUDA whole rows are copied by a Triton kernel,
:mod:`sparse_attn.ops.row_gather`); ``order[p]`` is the original position of the
token at permuted position ``p``. Index tables are built once per (layout, device) and cached.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .checks import check_int
from .ops.row_gather import gather_rows

__all__ = ["Layout", "default_tile"]

TEXT_POSITIONS = ("before", "after")


def default_tile(rank: int) -> tuple[int, ...]:
    """A tile of 128 tokens for a grid of ``rank`` dimensions (one tile per default 128-token block).

    1D: 128; 2D: ``(8, 16)``; 3D: ``(2, 8, 8)`` (two frames of 8x8 patches: video neighbourhoods
    are usually narrower in time than in space).
    """
    tiles = {1: (128,), 2: (8, 16), 3: (2, 8, 8)}
    if isinstance(rank, bool) or rank not in tiles:
        raise ValueError(f"rank must be 1, 2 or 3 (grid dimensions), got {rank!r}")
    return tiles[rank]


def _as_sizes(name: str, value, rank: int | None = None) -> tuple[int, ...]:
    """``value`` (an int or a tuple of ints, each >= 1) as a tuple; an int is repeated ``rank`` times
    (once when ``rank`` is not given: a 1D size)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,) * (1 if rank is None else rank)
    if not isinstance(value, (tuple, list)) or not value:
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints, got {value!r}")
    for item in value:
        check_int(name, item)
    if rank is not None and len(value) != rank:
        raise ValueError(f"{name} must have one entry per grid dimension ({rank}), got {tuple(value)}")
    return tuple(int(item) for item in value)


@dataclass(frozen=True)
class Layout:
    """A 1D, 2D ``(H, W)`` or 3D ``(T, H, W)`` token grid, optional text tokens, and a tile permutation.

    Args:
        grid: the grid's size per dimension (raster order, last dimension fastest); an int is a
            1D grid of that many tokens.
        tile: tile size per dimension (an int applies to every dimension); ``None`` keeps the
            raster order (one tile covering the grid). Tiles need not divide the grid.
        text_tokens: number of text tokens attending jointly with the grid (0 for none).
        text_position: ``"after"`` (default) or ``"before"`` the grid tokens.
    """

    grid: tuple[int, ...]
    tile: tuple[int, ...] | None = None
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = _as_sizes("grid", self.grid)
        if len(grid) > 3:
            raise ValueError(f"grid must have 1, 2 or 3 dimensions, got {grid}")
        object.__setattr__(self, "grid", grid)
        tile = grid if self.tile is None else _as_sizes("tile", self.tile, len(grid))
        object.__setattr__(self, "tile", tuple(min(t, g) for t, g in zip(tile, grid, strict=True)))
        check_int("text_tokens", self.text_tokens, minimum=0)
        if self.text_position not in TEXT_POSITIONS:
            raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got {self.text_position!r}")

    # Sizes -----------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return len(self.grid)

    @property
    def grid_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def seq_len(self) -> int:
        """Sequence length: grid tokens plus text tokens."""
        return self.grid_tokens + self.text_tokens

    @property
    def grid_start(self) -> int:
        """Position of the first grid token (the grid is contiguous in both orders)."""
        return self.text_tokens if self.text_position == "before" else 0

    @property
    def tile_grid(self) -> tuple[int, ...]:
        """Tiles per dimension (the last one short where the tile does not divide the grid)."""
        return tuple(-(-g // t) for g, t in zip(self.grid, self.tile, strict=True))

    @property
    def tiles_divide_grid(self) -> bool:
        return all(g % t == 0 for g, t in zip(self.grid, self.tile, strict=True))

    def check_sequence(self, name: str, length: int) -> None:
        """Raise ``ValueError`` naming ``name`` unless ``length`` is this layout's sequence length."""
        if length != self.seq_len:
            raise ValueError(
                f"{name} has {length} tokens but the layout (grid={self.grid}, product {self.grid_tokens}, "
                f"plus text_tokens={self.text_tokens}) has {self.seq_len}"
            )

    # Index tables (cached per device) --------------------------------------------------
    def order(self, device=None) -> torch.Tensor:
        """int64 ``(S,)``: the original position of the token at each permuted position."""
        return _tables(self, _device(device))[0]

    def inverse(self, device=None) -> torch.Tensor:
        """int64 ``(S,)``: the permuted position of the token at each original position."""
        return _tables(self, _device(device))[1]

    def coordinates(self, device=None) -> torch.Tensor:
        """int64 ``(rank, S)``: grid coordinates of the token at each *permuted* position; -1 for text tokens."""
        return _tables(self, _device(device))[2]

    def is_text(self, positions: torch.Tensor) -> torch.Tensor:
        """Bool, same shape as ``positions`` (int, either order): whether those positions hold text tokens."""
        start = self.grid_start
        return (positions < start) | (positions >= start + self.grid_tokens)

    # Permutation ---------------------------------------------------------------------------
    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, S, ...)`` in the original order -> the tile order (a gather along dimension 2)."""
        self.check_sequence("the tensor", x.shape[2])
        return gather_rows(x, self.order(x.device))

    def unpermute(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`permute`."""
        self.check_sequence("the tensor", x.shape[2])
        return gather_rows(x, self.inverse(x.device))

    @property
    def is_identity(self) -> bool:
        """Whether the permutation leaves every token in place (one tile, or tiles that are whole rows)."""
        return all(t == g for t, g in zip(self.tile[1:], self.grid[1:], strict=True))


def _device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


@functools.lru_cache(maxsize=64)
def _tables(layout: Layout, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, inverse, coordinates)`` of ``layout`` on ``device``."""
    grid, tile = layout.grid, layout.tile
    # Raster coordinates of every grid token, last dimension fastest.
    axes = [torch.arange(g, device=device) for g in grid]
    coords = torch.stack([c.reshape(-1) for c in torch.meshgrid(*axes, indexing="ij")])  # (rank, N)
    # Sort key: the tile's raster index over the tile grid, then the offset's raster index inside a
    # full tile. Short border tiles simply have no tokens at the missing offsets, so the key stays
    # unique and the sort is padding-free.
    tile_index = torch.zeros_like(coords[0])
    offset_index = torch.zeros_like(coords[0])
    for dim, (t, n_tiles) in enumerate(zip(tile, layout.tile_grid, strict=True)):
        tile_index = tile_index * n_tiles + coords[dim] // t
        offset_index = offset_index * t + coords[dim] % t
    key = tile_index * math.prod(tile) + offset_index
    grid_order = torch.argsort(key)
    start, n_grid, n_text = layout.grid_start, layout.grid_tokens, layout.text_tokens
    order = torch.arange(layout.seq_len, device=device)
    order[start : start + n_grid] = grid_order + start
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(layout.seq_len, device=device)
    coordinates = torch.full((layout.rank, n_grid + n_text), -1, dtype=torch.int64, device=device)
    coordinates[:, start : start + n_grid] = coords[:, grid_order]
    return order, inverse, coordinates
