"""Sliding Tile Attention (STA): 3D (or 2D) sliding windows that move tile by tile.

Paper: Peiyuan Zhang, Yongqi Chen, Runlong Su, Hangliang Ding, Ion Stoica, Zhengzhong Liu,
Hao Zhang, "Fast Video Generation with Sliding Tile Attention", ICML 2025, arXiv:2502.04507.

Rule: the grid is cut into tiles (``tile``, one size per dimension) and the tokens ordered
tile by tile (the layout's tile permutation, applied inside the attention call). A query in
tile ``g`` (tile coordinates) attends to every key in the ``window`` tiles around ``g`` per
dimension: tile coordinates ``[start, start + window)`` with
``start = clamp(g - window // 2, 0, n_tiles - window)``, i.e. centred on the query's tile and
shifted inward at the borders, as neighbourhood attention does per token. Every query of a
tile shares its window, and a window is a union of whole tiles, so with tiles that divide the
grid and a block size dividing the tile volume every kept block is whole: the pattern is
block-exact and runs on the block kernels. Text tokens (``text_tokens=``): text queries
attend to everything and every query attends to every text token (the paper's HunyuanVideo
setting, which keeps text-video attention dense).

Defaults: ``tile=(6, 8, 8)`` (384 tokens: the paper's tile for HunyuanVideo, three 128-token
blocks), ``window=(3, 3, 3)`` tiles (the window of the FastVideo documentation's example;
the paper searches windows per head and layer, which is not done here). For a 2D grid the
defaults are ``tile=(8, 8)`` and ``window=(3, 3)``.

Choices where the paper leaves room:

- Grids that the tile does not divide (the paper picks tiles that divide the latent grid):
  the last tile per dimension is short (a padding-free permutation), tiles are counted on the
  ceiling grid, and a query sees every key of the tiles of its window. Blocks then straddle
  tiles and the pattern carries a token rule (exact, but it runs on ``flex``/``reference``
  instead of the block kernels); pick a tile that divides the grid for kernel speed.
- Even windows are accepted (``window // 2`` tiles before the query's tile, the rest after).
- One list for every batch element and head (the paper's per-head window search is offline).
- Unverified here: the paper's exact default window per model (its tables list searched
  per-head configurations); the stored copies reachable in this session were summaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layouts import Layout
from ..masked_pattern import MaskedPattern
from ..ops.grid_windows import DimWindow, window_pattern
from ..registry import register_method
from ._spatial import check_grid_option, per_dim, spatial_layout, static_pattern

Sizes = int | tuple[int, ...]

_DEFAULT_TILE = {1: (128,), 2: (8, 8), 3: (6, 8, 8)}
_DEFAULT_WINDOW = {1: (3,), 2: (3, 3), 3: (3, 3, 3)}


@dataclass(frozen=True)
class SlidingTileConfig:
    grid: tuple[int, ...] | None = None
    tile: Sizes | None = None
    window: Sizes | None = None
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        check_int("text_tokens", self.text_tokens, minimum=0)
        rank = 3 if grid is None else len(grid)
        tile = _DEFAULT_TILE[rank] if self.tile is None else per_dim("tile", self.tile, rank)
        window = _DEFAULT_WINDOW[rank] if self.window is None else per_dim("window", self.window, rank)
        if grid is not None:
            tiles = tuple(-(-size // min(t, size)) for size, t in zip(grid, tile, strict=True))
            if any(w > n for w, n in zip(window, tiles, strict=True)):
                raise ValueError(f"window (in tiles) {window} is larger than the tile grid {tiles} of grid={grid}")

    def resolved(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(tile, window)`` with the defaults for a grid of ``rank`` dimensions."""
        tile = _DEFAULT_TILE[rank] if self.tile is None else per_dim("tile", self.tile, rank)
        window = _DEFAULT_WINDOW[rank] if self.window is None else per_dim("window", self.window, rank)
        return tile, window


def tile_window(size: int, tile: int, window: int, device=None) -> DimWindow:
    """One dimension's window tables: the keys of the ``window`` tiles around each query's tile."""
    n_tiles = -(-size // tile)
    own = torch.arange(size, device=device) // tile
    start = torch.clamp(own - window // 2, 0, n_tiles - window)
    return DimWindow(lo=start * tile, hi=torch.clamp((start + window) * tile, max=size))


@register_method(
    "sliding_tile",
    config=SlidingTileConfig,
    paper="Zhang et al. 2025, Fast Video Generation with Sliding Tile Attention (arXiv:2502.04507)",
    summary="per query tile: the window of tiles around it (3D, shifted at borders); block-exact on the tile order",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: SlidingTileConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Non-causal pattern over the tile order of ``grid``; one list for every batch and head."""
    rank = len(config.grid) if config.grid is not None else 3
    tile, window = config.resolved(rank)
    layout = spatial_layout("sliding_tile", q, k, config, causal=causal, tile=tile)
    return static_pattern(_build, window, layout, block_q, block_k, q.device)


def _build(window: tuple[int, ...], layout: Layout, *, block_q: int, block_k: int, device) -> MaskedPattern:
    windows = tuple(
        tile_window(size, t, w, device) for size, t, w in zip(layout.grid, layout.tile, window, strict=True)
    )
    return window_pattern(layout, windows, block_q=block_q, block_k=block_k, device=device)
