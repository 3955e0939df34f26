"""Neighborhood attention (NATTEN semantics) and its strided generalisation (GNA) on 1D/2D/3D token grids.

Papers: Ali Hassani, Steven Walton, Jiachen Li, Shen Li, Humphrey Shi, "Neighborhood Attention
Transformer", CVPR 2023, arXiv:2204.07143; Ali Hassani, Humphrey Shi, "Dilated Neighborhood
Attention Transformer", arXiv:2209.15001 (dilation); Ali Hassani, Fengzhe Zhou, Aditya Kane,
Jiannan Huang, Chieh-Yun Chen, Min Shi, Steven Walton, Markus Hoehnerbach, Vijay Thakkar,
Michael Isaev, Qinsheng Zhang, Bing Xu, Haicheng Wu, Wen-mei Hwu, Ming-Yu Liu, Humphrey Shi,
"Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of
Light", arXiv:2504.16922 (stride).

Rule, per grid dimension of size ``L`` with window ``w``, dilation ``r`` and stride ``s`` (the
window is the product over dimensions):

* Dilation splits the positions into ``r`` groups by residue ``i % r``; a query sees keys of its
  own group only, in group coordinates ``x = i // r`` over the group's ``L_g = ceil((L - g) / r)``
  positions.
* Stride groups ``s`` consecutive queries (in group coordinates) that share one window: the
  window of the group's *leader*, its centre query ``min((x // s) * s + s // 2, L_g - 1)``.
  ``s = 1`` is neighbourhood attention; ``s = w`` is blocked (non-overlapping) attention.
* The window holds ``w`` keys starting at ``clamp(leader - w // 2, 0, L_g - w)``: centred on the
  leader, shifted inward at the borders so that every query sees exactly ``w`` keys per
  dimension (NATTEN's rule, not zero padding).

Text tokens (``text_tokens=``): text queries attend to every token and every query attends
to every text token (MM-DiT joint attention; the window applies between grid tokens only).

Defaults: ``window=7`` (the NAT paper's kernel size; NATTEN itself has no default),
``dilation=1``, ``stride=1``, ``tile=None``: chosen per grid, window and block size among
:func:`sparse_attn.layouts.default_tile` (``(8, 16)`` in 2D, ``(2, 8, 8)`` in 3D), the raster
order (no permutation) and every tile of ``block_q`` tokens with power-of-two sides, as the one
whose pattern keeps the fewest blocks (:func:`chosen_layout`; counted without building lists,
cached per call signature). The tile changes only which blocks the kernels compute, never the
result (the token rule is exact). Measured on the H200 at Wan 2.1's 21x45x80 grid, the
``(2, 8, 8)`` tiles kept 0.114 of the blocks for 7x7x7 windows where ``(8, 4, 4)`` keeps 0.039
(``benchmarks/token_rules.py``). Pass ``tile=`` to fix it.

Blocks and exactness. The tokens are reordered by the layout's tile permutation (done inside
the attention call), the pattern keeps every block pair holding a (query, key) pair of the
windows, and the pattern's token rule makes the result exactly NATTEN's on every backend
(see :mod:`sparse_attn.ops.grid_windows` and :mod:`sparse_attn.masked_pattern`). Where the
windows cover whole blocks only, the pattern has no rule and runs on the block kernels: with
tiles dividing the grid, block size = tile volume, ``stride = tile`` and a window that is an
odd multiple of the tile (e.g. ``tile=(2, 8, 8), stride=(2, 8, 8), window=(6, 24, 24)``), the
windows start on tile boundaries (GNA's "perfectly block-sparse" case).

Choices where the papers leave room:

- Even windows are accepted as GNA defines them (``w // 2`` keys before the leader,
  ``w // 2 - 1`` after); NATTEN's original neighbourhood attention takes odd windows only.
- ``stride`` must not exceed ``window`` (GNA: larger strides leave keys no query sees), and
  ``window * dilation`` must not exceed the grid (NATTEN's requirement).
- The windows are the same for every batch element and head (one list for all).
- Causal (per-dimension causal masks, a later NATTEN feature) is not implemented: the method
  raises on ``causal=True``.
- The API's ``block_q`` / ``block_k`` are used as given; blocks that fall across tile edges
  (short border tiles, tiles that are not a multiple of the block) are exact through the
  token rule. ``block_k=64`` keeps 23-30 % fewer pairs for the default windows and measured
  15-19 % faster on the H200's Gluon kernel (Wan 2.1 11.57 -> 9.38 ms, HunyuanVideo 11.01 ->
  9.36 ms; ``benchmarks/results/h200/neighborhood_block_k_fused_s43.json``); the default stays
  the API's 128.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..layouts import Layout, default_tile
from ..masked_pattern import MaskedPattern
from ..ops.grid_windows import DimWindow, kept_blocks, window_pattern
from ..registry import register_method
from ._spatial import check_grid_option, per_dim, spatial_layout, static_pattern

Sizes = int | tuple[int, ...]


@dataclass(frozen=True)
class NeighborhoodConfig:
    grid: tuple[int, ...] | None = None
    window: Sizes = 7
    dilation: Sizes = 1
    stride: Sizes = 1
    tile: tuple[int, ...] | None = None
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        check_int("text_tokens", self.text_tokens, minimum=0)
        rank = 3 if grid is None else len(grid)
        windows = per_dim("window", self.window, rank)
        dilations = per_dim("dilation", self.dilation, rank)
        strides = per_dim("stride", self.stride, rank)
        if self.tile is not None:
            per_dim("tile", self.tile, rank)
        for w, s in zip(windows, strides, strict=True):
            if s > w:
                raise ValueError(
                    f"stride must not exceed window in any dimension, got stride={strides}, window={windows}"
                )
        if grid is not None:
            for size, w, r in zip(grid, windows, dilations, strict=True):
                if w * r > size:
                    raise ValueError(
                        f"window * dilation must fit the grid in every dimension: window={windows}, "
                        f"dilation={dilations}, grid={grid}"
                    )


def neighborhood_window(size: int, window: int, dilation: int, stride: int, device=None) -> DimWindow:
    """One dimension's window tables (NATTEN/GNA rule in the module docstring)."""
    i = torch.arange(size, device=device)
    residue, x = i % dilation, i // dilation
    group_size = (size - residue + dilation - 1) // dilation
    leader = torch.minimum((x // stride) * stride + stride // 2, group_size - 1)
    start = torch.minimum(torch.clamp(leader - window // 2, min=0), group_size - window)
    return DimWindow(lo=start, hi=start + window, dilation=dilation)


@register_method(
    "neighborhood",
    config=NeighborhoodConfig,
    paper="Hassani et al. 2023, Neighborhood Attention Transformer (arXiv:2204.07143); GNA stride (arXiv:2504.16922)",
    summary="NATTEN windows on a 1D/2D/3D grid (shifted at borders, dilation, GNA stride); tile-permuted blocks",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: NeighborhoodConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Non-causal pattern over the tile order of ``grid``; one list for every batch and head."""
    rank = len(config.grid) if config.grid is not None else 3
    tile = config.tile if config.tile is not None else default_tile(rank)
    layout = spatial_layout("neighborhood", q, k, config, causal=causal, tile=tile)
    if config.tile is None:
        layout = chosen_layout(config, layout, block_q, block_k, q.device)
    return static_pattern(_build, config, layout, block_q, block_k, q.device)


def _windows(config: NeighborhoodConfig, grid: tuple[int, ...], device) -> tuple[DimWindow, ...]:
    return tuple(
        neighborhood_window(size, w, r, s, device)
        for size, w, r, s in zip(
            grid,
            per_dim("window", config.window, len(grid)),
            per_dim("dilation", config.dilation, len(grid)),
            per_dim("stride", config.stride, len(grid)),
            strict=True,
        )
    )


def _build(config: NeighborhoodConfig, layout: Layout, *, block_q: int, block_k: int, device) -> MaskedPattern:
    return window_pattern(
        layout, _windows(config, layout.grid, device), block_q=block_q, block_k=block_k, device=device
    )


def candidate_tiles(grid: tuple[int, ...], block: int) -> list[tuple[int, ...] | None]:
    """The tiles :func:`chosen_layout` compares: :func:`~sparse_attn.layouts.default_tile` first, the
    raster order (``None``: no permutation), then every tile of ``block`` tokens with power-of-two
    sides that fit the grid (none when ``block`` is not a power of two)."""
    rank = len(grid)
    tiles: list[tuple[int, ...] | None] = [default_tile(rank), None]
    if block & (block - 1) == 0 and rank > 1:
        bits = block.bit_length() - 1
        for split in itertools.product(range(bits + 1), repeat=rank - 1):
            if sum(split) <= bits:
                tile = tuple(1 << b for b in (*split, bits - sum(split)))
                if all(t <= g for t, g in zip(tile, grid, strict=True)) and tile not in tiles:
                    tiles.append(tile)
    return tiles


@functools.lru_cache(maxsize=64)
def chosen_layout(config: NeighborhoodConfig, layout: Layout, block_q: int, block_k: int, device) -> Layout:
    """The layout (``layout`` with another tile) whose pattern keeps the fewest blocks among
    :func:`candidate_tiles` (ties: the earlier candidate, so the default tile, then the raster
    order). Every candidate gives the same attention (the token rule is exact); they differ in how
    many blocks the kernels compute. Counted without building lists, once per distinct call."""
    windows = _windows(config, layout.grid, device)
    best, best_count = layout, None
    for tile in candidate_tiles(layout.grid, block_q):
        candidate = Layout(layout.grid, tile=tile, text_tokens=layout.text_tokens, text_position=layout.text_position)
        count = kept_blocks(candidate, windows, block_q=block_q, block_k=block_k, device=device)
        if best_count is None or count < best_count:
            best, best_count = candidate, count
    return best
