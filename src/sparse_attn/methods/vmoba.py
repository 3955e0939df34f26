"""VMoBA: mixture-of-block attention for video, with 1D/2D/3D partitions cycling over layers.

Paper: Jianzong Wu, Liang Hou, Haotian Yang, Xin Tao, Ye Tian, Pengfei Wan, Di Zhang, Yunhai
Tong, "VMoBA: Mixture-of-Block Attention for Video Diffusion Models", 2025, arXiv:2506.23858.

Rule. MoBA (:mod:`sparse_attn.methods.moba`) routes each query token to key blocks by the gate
``q · mean(K[block])``; VMoBA changes three things:

* Layer-wise recurrent partition: the keys are cut into video blocks that depend on the
  layer: layer ``l`` uses ``("1d", "2d", "3d")[l % 3]``. 1D: ``chunk_1d`` whole frames; 2D: a
  ``chunk_2d = (h, w)`` spatial patch through all frames; 3D: a ``chunk_3d = (t, h, w)`` cube.
  The tokens are reordered so each block is contiguous (the layout's tile permutation with
  the block as the tile, applied inside the attention call), so the pattern is MoBA's
  token-level lists (``block_q = 1``, ``block_k`` = the block's volume).
* Global block selection: per head, the gates of all (query token, key block) pairs are
  min-max normalised over the whole head and the pairs are taken in descending order across
  all queries of the head (``selection="head_global"``), so important queries get more blocks;
  ``selection="query_head"`` normalises and ranks per query instead.
* Threshold selection: pairs are added until their normalised gates sum to ``threshold`` of
  the head's (or query's) total. Every query always keeps its own block, whose gates count
  towards the threshold first.

Defaults: ``threshold=0.25`` and per-partition block counts from the released code
(``simsum_threshold=0.25`` in its attention function; its FLOPs script cuts a 21 x 20 x 32
latent into 7 / 40 / 60 blocks for 1D / 2D / 3D, i.e. ``chunk_1d=3`` frames, ``chunk_2d=(4, 4)``,
``chunk_3d=(7, 4, 8)``), ``selection="head_global"`` (the paper's global selection; the
released function's default argument is the per-query variant), ``layer=0``.

Choices where the paper leaves room (the paper's text could not be read in this session:
the stored copies held the abstract and summaries; the released code was read for the
details above, and nothing is copied from it):

- Block sizes must divide the grid (as in the released code); a grid they do not divide
  raises ``ValueError`` naming the option.
- The threshold stops at the smallest number of pairs whose mass reaches it (a query whose
  own block already reaches it keeps only its own block); the released code always adds at
  least one more pair.
- Ties in the ranking go to the earlier (query, block) pair (a stable sort).
- Gates are per query head with the KV head's mean keys (GQA without expanding K), unscaled
  float32; lists are per query head (``kv_counts`` ``(B, Hq, S)``).
- Text tokens (MM-DiT joint attention; the paper's models attend to text by cross-attention
  instead) are taken after the video only (``text_position="after"``, so the video blocks stay
  aligned): text queries attend to every token, every query attends to every text token, and
  text blocks take no part in the selection or its normalisation.
- Memory: each head's (query token, block) gate table, ``S * S / block_k`` floats, is held
  while that head is ranked (global selection needs the whole head), one head at a time.
- Ranking a whole head sorts only the pairs that can be kept: a histogram of the normalised
  gates bounds from below the mass at or above each of 1024 equal bins' lower edges, and pairs
  under the highest edge whose bound reaches the needed mass cannot be kept (they rank after at
  least that mass). The kept set is exactly the full sort's (tested against it, ties included).
  On the CPU only: on the H200 it was no faster (HunyuanVideo 2D layer: estimate 67.2 ms against
  72.1 with the full sort; 1D layer 22.5 against 16.0, ``vmoba_kernel_s52.json``) and its float32
  prefix sums, scanned over the candidates instead of the whole head, kept a different pattern at
  the threshold's edge there, so CUDA gates take the full sort.
- The API's ``block_q`` / ``block_k`` are ignored: the granularity is the rule's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..masked_pattern import MaskedPattern
from ..ops.gqa import grouped_matmul, kv_heads_of
from ..ops.pooling import mean_pool_blocks
from ..ops.to_pattern import stream_pattern_by_heads
from ..registry import register_method
from ._spatial import check_grid_option, per_dim, spatial_layout

PARTITIONS = ("1d", "2d", "3d")
SELECTIONS = ("head_global", "query_head")


@dataclass(frozen=True)
class VmobaConfig:
    grid: tuple[int, ...] | None = None
    layer: int = 0
    chunk_1d: int = 3
    chunk_2d: tuple[int, int] = (4, 4)
    chunk_3d: tuple[int, int, int] = (7, 4, 8)
    threshold: float = 0.25
    selection: str = "head_global"
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        grid = check_grid_option(self)
        check_int("layer", self.layer, minimum=0)
        check_int("chunk_1d", self.chunk_1d)
        per_dim("chunk_2d", self.chunk_2d, 2)
        per_dim("chunk_3d", self.chunk_3d, 3)
        check_fraction("threshold", self.threshold)
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        check_int("text_tokens", self.text_tokens, minimum=0)
        if self.text_tokens and self.text_position != "after":
            raise ValueError(
                "vmoba takes text tokens after the video only (text_position='after'), so its blocks stay aligned"
            )
        if grid is not None:
            if len(grid) != 3:
                raise ValueError(f"vmoba needs a video grid (T, H, W), got grid={grid}")
            name, tile = self.partition()
            if any(size % t for size, t in zip(grid, tile, strict=True)):
                raise ValueError(f"{name} (block {tile} for layer {self.layer}) must divide grid={grid}")

    def partition(self) -> tuple[str, tuple[int, int, int]]:
        """The option naming this layer's block and the block as a ``(t, h, w)`` tile of the grid."""
        kind = PARTITIONS[self.layer % 3]
        frames, height, width = self.grid
        if kind == "1d":
            return "chunk_1d", (self.chunk_1d, height, width)
        if kind == "2d":
            return "chunk_2d", (frames, *self.chunk_2d)
        return "chunk_3d", tuple(self.chunk_3d)


# Bins of the candidate cut (:func:`_global_cut`): a power of two, so a value's bin is exact.
CUT_BINS = 1024
CUT_MARGIN = 1e-3


def select_pairs(gates: torch.Tensor, own: torch.Tensor, threshold: float, *, per_query: bool) -> torch.Tensor:
    """VMoBA's threshold selection on gates ``(..., S, C)`` (float32) with each query's own block
    ``own`` (bool, same shape): bool mask of the kept (query, block) pairs.

    Ranked over the last dimension per query (``per_query``) or over the last two per head."""
    dims = (-1,) if per_query else (-2, -1)
    low, high = gates.amin(dims, keepdim=True), gates.amax(dims, keepdim=True)
    span = torch.where(high - low > 1e-6, high - low, torch.ones_like(high))
    norm = (gates - low) / span
    total = norm.sum(dims, keepdim=True)
    needed = threshold * total - (norm * own).sum(dims, keepdim=True)
    others = norm.masked_fill(own, -1.0)  # below every real value: the own block ranks last
    if per_query or gates.device.type != "cpu":  # the candidate cut pays on the CPU only (module docstring)
        kept = sorted_cut(others, needed)
    else:
        kept = _global_cut(others.flatten(-2), needed.flatten(-2)).view_as(gates)
    return kept | own


def sorted_cut(values: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """The pairs kept along the last dimension of ``values`` (``-1``: not a candidate): ranked in
    descending order (ties: the earlier pair first), a pair is kept while the mass of the pairs
    ranked before it is still short of ``needed`` (shape ``(..., 1)``). The plain rule, one sort."""
    ranked, order = torch.sort(values, dim=-1, descending=True, stable=True)
    before = torch.cumsum(ranked.clamp(min=0), dim=-1) - ranked.clamp(min=0)
    kept_sorted = (before < needed) & (ranked >= 0)
    return torch.zeros_like(kept_sorted).scatter_(-1, order, kept_sorted)


def _global_cut(values: torch.Tensor, needed: torch.Tensor) -> torch.Tensor:
    """:func:`sorted_cut` over rows of ``values`` in ``[0, 1]`` (or ``-1``), sorting only the candidates.

    A histogram of :data:`CUT_BINS` equal bins bounds the mass at or above each bin's lower edge
    from below; the highest edge ``t0`` whose bound reaches ``needed`` (plus :data:`CUT_MARGIN`
    of it, for the rounding of the float32 running sums) leaves every kept pair at or
    above it (a pair below ``t0`` has at least that mass ranked before it). Only the values at or
    above ``t0`` are sorted (for VMoBA's 2D layer about the kept fifth of a head's pairs, not all of
    them); their ranks, and so the prefix masses, are the same as in the full sort."""
    lead, count = values.shape[:-1], values.shape[-1]
    rows = values.reshape(-1, count)
    limits = needed.reshape(-1, 1)
    n_rows = rows.shape[0]
    # int32 bins (as large as the values, not twice): exact, since CUT_BINS is a power of two.
    index = (rows * CUT_BINS).to(torch.int32).clamp_(max=CUT_BINS - 1)
    index += torch.arange(0, n_rows * CUT_BINS, CUT_BINS, device=rows.device, dtype=torch.int32)[:, None]
    index.masked_fill_(~(rows >= 0), n_rows * CUT_BINS)  # the last slot: not candidates (NaN included)
    counts = torch.bincount(index.flatten(), minlength=n_rows * CUT_BINS + 1)[:-1].view(n_rows, CUT_BINS)
    del index
    edges = torch.arange(CUT_BINS, device=rows.device, dtype=torch.float64) / CUT_BINS
    at_least = (counts * edges).flip(-1).cumsum(-1).flip(-1)  # mass at or above each lower edge, bounded below
    # Edges 0 .. reaching-1 reach needed, with 0.1 % to spare for the float32 running sums of the
    # ranking (a pair just under the edge must rank past the needed mass in them too).
    reaching = (at_least >= limits.double() * (1 + CUT_MARGIN)).sum(-1)
    floor = torch.where(reaching > 0, (reaching - 1).double() / CUT_BINS, 0.0).to(rows.dtype)
    kept = torch.zeros_like(rows, dtype=torch.bool)
    for row in range(n_rows):
        where = (rows[row] >= floor[row]).nonzero().squeeze(1)  # ascending: ties keep their order
        kept[row, where] = sorted_cut(rows[row, where], limits[row])
    return kept.view(*lead, count)


@register_method(
    "vmoba",
    config=VmobaConfig,
    paper="Wu et al. 2025, VMoBA: Mixture-of-Block Attention for Video Diffusion Models (arXiv:2506.23858)",
    summary="per query token: own video block + blocks by q·mean(K) until 25% of the head's gate mass; 1D/2D/3D by layer",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: VmobaConfig, *, causal: bool, block_q: int, block_k: int
) -> MaskedPattern:
    """Token-level pattern (``block_q = 1``, ``block_k`` = the layer's block volume) over the block order.

    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``; lists per query head, ``kv_counts`` int32 ``(B, Hq, S)``.
    """
    tile = config.partition()[1] if config.grid is not None else None
    layout = spatial_layout("vmoba", q, k, config, causal=causal, tile=tile)
    block = math.prod(layout.tile)
    batch, q_heads, seq, _ = q.shape
    group = q_heads // k.shape[1]
    video = layout.grid_tokens  # the video comes first; text tokens (if any) follow it
    q_video = layout.permute(q)[:, :, :video]
    pooled = mean_pool_blocks(layout.permute(k)[:, :, :video], block)  # (B, Hkv, C, D) float32
    n_blocks = pooled.shape[2]
    n_kv = -(-seq // block)
    own = (torch.arange(video, device=q.device) // block)[:, None] == torch.arange(n_blocks, device=q.device)

    def mask_heads(heads: range) -> torch.Tensor:
        gates = grouped_matmul(q_video[:, heads.start : heads.stop].float(), pooled[:, kv_heads_of(heads, group)])
        selected = select_pairs(gates, own, config.threshold, per_query=config.selection == "query_head")
        if n_kv == n_blocks:
            return selected
        # Text blocks: every video query keeps them, and text queries keep every block.
        text_columns = selected.new_ones((*selected.shape[:3], n_kv - n_blocks))
        text_rows = selected.new_ones((*selected.shape[:2], seq - video, n_kv))
        return torch.cat([torch.cat([selected, text_columns], -1), text_rows], -2)

    pattern = stream_pattern_by_heads(
        mask_heads,
        batch=batch,
        heads=q_heads,
        group=group,
        seq_q=seq,
        seq_k=seq,
        block_q=1,
        block_k=block,
        causal=False,
        device=q.device,
        # The gates, their sort (values and int64 order) and the masks, per head.
        head_elements=6 * batch * seq * n_kv,
    )
    return MaskedPattern.over_layout(pattern, layout)
