"""DraftAttention: a low-resolution "draft" attention map over pooled spatial regions picks the blocks to compute.

Paper: Xuan Shen, Chenxia Han, Yufa Zhou, Yanyue Xie, Yifan Gong, Quanyi Wang, Yiwei Wang,
Yanzhi Wang, Pu Zhao, Jiuxiang Gu, "DraftAttention: Fast Video Diffusion via Low-Resolution
Attention Guidance", 2025, arXiv:2505.14708.

Rule. Each frame's latent ``(H, W)`` is cut into regions of ``pool = (ph, pw)`` tokens (the
last region per dimension short where ``pool`` does not divide it). q and k are average-pooled
per region (the draft query and key), and the draft attention map is the softmax over regions
of ``pooled_q · pooled_k * D**-0.5`` per head: ``(R, R)`` with ``R = T * ceil(H/ph) * ceil(W/pw)``
regions. The map selects region pairs, which become block pairs: the tokens are reordered so
each region is contiguous (the layout's tile permutation with tile ``(1, ph, pw)``, applied
inside the attention call and undone on the output), so with ``ph * pw`` = the block size and
a pool that divides the frame, every block is exactly one region and the selection is the
block pattern. Text tokens (``text_tokens=``, before or after the video) are global: text
queries attend to everything and every query attends to every text token.

Selection (``sparsity``: the fraction of region pairs skipped):

* ``selection="head"`` (default; the released code's rule): per head, the
  ``R * R - floor(sparsity * R * R)`` largest entries of the whole draft map are kept, so rows
  with peaked attention keep fewer regions and diffuse rows more.
* ``selection="row"``: per query region, its ``ceil((1 - sparsity) * R)`` largest entries.

Defaults: ``pool=(8, 16)`` (128 tokens: one region per 128-token block), ``sparsity=0.9``
(the paper's headline setting and the released code's default).

Choices where the paper leaves room (the paper's text could not be read in this session: the
stored copies held its abstract; the released code was read for the pooling, the head-wide
percentile and the reordering, and nothing is copied from it):

- Ties at the selection boundary go to the earlier entry (a stable sort); the released code
  keeps every entry equal to the threshold.
- Every query region keeps at least its best region (the head-wide percentile can leave a
  region's row empty; a block row of the pattern must not be).
- Blocks that are not single regions (a pool that does not divide the frame, or a block size
  other than ``ph * pw``): a block pair is kept when any (query region, key region) pair of
  its tokens is selected, and kept blocks are computed whole. The pattern carries no token
  rule (block-exact), as in the paper, whose kernel computes whole blocks.
- Draft scores are float32, per query head against its KV head's pooled keys (GQA without
  expanding K); lists are per query head (``kv_counts`` ``(B, Hq, n_q_blocks)``).
- 2D grids (images) are one frame.
- Memory: a head's ``(R, R)`` draft map and its ``(n_q_blocks, n_kv_blocks)`` block mask are
  held while the head is selected (head-wide selection needs the whole head), one chunk of
  heads at a time; ``R`` is about ``S / 128``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..layouts import Layout
from ..masked_pattern import MaskedPattern
from ..ops.gqa import grouped_matmul, kv_heads_of
from ..ops.to_pattern import stream_pattern_by_heads
from ..registry import register_method
from ._spatial import check_grid_option, per_dim, spatial_layout

__all__ = ["DraftConfig", "block_cells", "cell_block_mask", "region_ids"]

SELECTIONS = ("head", "row")


@dataclass(frozen=True)
class DraftConfig:
    grid: tuple[int, ...] | None = None
    pool: tuple[int, int] = (8, 16)
    sparsity: float = 0.9
    selection: str = "head"
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        per_dim("pool", self.pool, 2)
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
            raise TypeError(f"sparsity must be a float, got {type(self.sparsity).__name__}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if grid is not None and len(grid) not in (2, 3):
            raise ValueError(f"draft needs a video grid (T, H, W) or an image grid (H, W), got grid={grid}")


def region_ids(layout: Layout, device) -> torch.Tensor:
    """int64 ``(S,)``: the tile (region) index of each token of ``layout``'s tile order, ``-1`` for text.

    Tile indices are the raster order of the tile grid, so they never decrease along the order."""
    coordinates = layout.coordinates(device)
    ids = torch.zeros(layout.seq_len, dtype=torch.int64, device=device)
    for dim, (tile, tiles) in enumerate(zip(layout.tile, layout.tile_grid, strict=True)):
        ids = ids * tiles + coordinates[dim].clamp(min=0) // tile
    return torch.where(coordinates[0] < 0, -1, ids)


def block_cells(cells: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells each ``block``-token block holds: int64 ``(n, m)`` (``-1``-padded; ``m`` the most any block
    holds) and bool ``(n,)`` whether the block holds text, from per-token cell ids ``cells`` (int64 ``(S,)``,
    ``-1`` for text).

    A block's tokens are split into runs of one cell; each run is listed (a cell met in two runs is
    listed twice, which the any-pair tests below do not mind)."""
    n = num_blocks(cells.numel(), block)
    padded = torch.nn.functional.pad(cells, (0, n * block - cells.numel()), value=-2).view(n, block)
    has_text = (padded == -1).any(-1)
    previous = torch.nn.functional.pad(padded[:, :-1], (1, 0), value=-3)
    starts = (padded >= 0) & (padded != previous)
    rank = starts.cumsum(-1) - 1
    width = max(1, int(starts.sum(-1).max()))
    listed = torch.full((n, width), -1, dtype=torch.int64, device=cells.device)
    rows = torch.arange(n, device=cells.device)[:, None].expand_as(padded)
    listed[rows[starts], rank[starts]] = padded[starts]
    return listed, has_text


def cell_block_mask(
    allowed: torch.Tensor, q_cells: tuple[torch.Tensor, torch.Tensor], k_cells: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Block mask from a cell-pair rule: query block ``a`` keeps key block ``b`` when some cell pair of theirs
    is allowed, or either holds text.

    ``allowed`` bool ``(..., C, C)``; ``q_cells`` / ``k_cells`` from :func:`block_cells` (the query side
    may be a slice of rows). Returns bool ``(..., n_q, n_kv)``."""
    q_ids, q_text = q_cells
    k_ids, k_text = k_cells
    pairs = allowed[..., q_ids.clamp(min=0)[:, :, None, None], k_ids.clamp(min=0)[None, None, :, :]]
    valid = (q_ids >= 0)[:, :, None, None] & (k_ids >= 0)[None, None, :, :]
    keep = (pairs & valid).any(-1).any(-2)
    return keep | q_text[:, None] | k_text[None, :]


def select_regions(draft: torch.Tensor, sparsity: float, selection: str) -> torch.Tensor:
    """Bool, ``draft``'s shape ``(..., R, R)``: the selected region pairs of a draft map (module docstring)."""
    regions = draft.shape[-1]
    if selection == "row":
        keep = max(1, math.ceil((1.0 - sparsity) * regions))
        flat, count = draft, keep
    else:
        total = regions * regions
        flat, count = draft.flatten(-2), max(1, total - math.floor(sparsity * total))
    order = torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :count]
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, order, True).view_as(draft)
    best = draft.argmax(-1, keepdim=True)  # every query region keeps its best region
    return chosen.scatter_(-1, best, True)


def pooled_regions(x: torch.Tensor, cells: torch.Tensor, regions: int) -> torch.Tensor:
    """Float32 ``(B, H, R, D)``: the mean of ``x`` (``(B, H, S, D)``, tile order) over each region's tokens."""
    grid = cells >= 0
    ids = cells[grid]
    sums = x.new_zeros((*x.shape[:2], regions, x.shape[-1]), dtype=torch.float32)
    sums.index_add_(2, ids, x[:, :, grid].float())
    counts = torch.bincount(ids, minlength=regions).clamp(min=1).to(torch.float32)
    return sums / counts[:, None]


@register_method(
    "draft",
    config=DraftConfig,
    paper="Shen et al. 2025, DraftAttention: Fast Video Diffusion via Low-Resolution Attention Guidance (arXiv:2505.14708)",
    summary="draft softmax over (8x16)-pooled regions; keep the top 10% region pairs per head; regions reordered into blocks",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: DraftConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Block pattern over the region order; lists per query head, ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``.

    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``."""
    pool = per_dim("pool", config.pool, 2)
    tile = (1, *pool) if config.grid is not None and len(config.grid) == 3 else pool
    layout = spatial_layout("draft", q, k, config, causal=causal, tile=tile)
    batch, q_heads, seq, dim = q.shape
    group = q_heads // k.shape[1]
    cells = region_ids(layout, q.device)
    regions = math.prod(layout.tile_grid)
    pooled_q = pooled_regions(layout.permute(q), cells, regions)
    pooled_k = pooled_regions(layout.permute(k), cells, regions)
    q_cells, k_cells = block_cells(cells, block_q), block_cells(cells, block_k)
    scale = dim**-0.5

    def mask_heads(heads: range) -> torch.Tensor:
        scores = grouped_matmul(pooled_q[:, heads.start : heads.stop], pooled_k[:, kv_heads_of(heads, group)])
        draft = torch.softmax(scores * scale, dim=-1)
        return cell_block_mask(select_regions(draft, config.sparsity, config.selection), q_cells, k_cells)

    n_q, n_kv = num_blocks(seq, block_q), num_blocks(seq, block_k)
    per_head = max(3 * regions * regions, n_q * q_cells[0].shape[1] * n_kv * k_cells[0].shape[1])
    pattern = stream_pattern_by_heads(
        mask_heads,
        batch=batch,
        heads=q_heads,
        group=group,
        seq_q=seq,
        seq_k=seq,
        block_q=block_q,
        block_k=block_k,
        causal=False,
        device=q.device,
        head_elements=batch * per_head,
    )
    return MaskedPattern.over_layout(pattern, layout)
