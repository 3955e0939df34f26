"""PSA (Pyramid Sparse Attention): each query block gives every KV block a pooling level; pooled K/V stand in for it.

Paper: Xiaolong Li, Youping Gu, Xi Lin, Weijie Wang, Bohan Zhuang, "PSA: Pyramid Sparse
Attention for Efficient Video Understanding and Generation", 2025, arXiv:2512.04025 (ZipLab).

Rule. Instead of keeping or dropping whole KV blocks, PSA keeps a pyramid of each block: level
0 is the block's keys and values, level ``l`` their means over groups of ``2**l`` consecutive
positions (the paper builds level ``l + 1`` by a kernel-2, stride-2 mean pool of level ``l``,
which is the same thing), and each query block assigns every KV block a level, or skips it:

* importance: for every (query block, KV block) pair, the largest attention probability among
  sampled tokens: every ``sample_stride``-th query of the query block and key of the KV block
  (the paper and its released code sample a quarter of the tokens of each block); the
  probabilities are those of each sampled query's softmax over all sampled keys (scaled
  ``q . k``); the video-generation estimator of the paper;
* levels (the paper's "threshold bound" mode, the default of its Wan 2.1 configurations): per
  query block the KV blocks are ranked by importance, each row normalised to sum 1, and a block
  whose *preceding* cumulative importance (the mass of the blocks ranked before it) is below
  ``thresholds[0]`` gets level 0, below ``thresholds[1]`` level 1, ..., below the last threshold
  the last pooled level, and the rest are skipped; the first
  ``int(min_full_fraction * n_kv) + 1`` ranked blocks are level 0 regardless;
* attention: one softmax per query over the exact keys of its level-0 blocks and the pooled
  keys of its pooled blocks, each pooled score raised by ``ln(2**l)`` (the log of the number of
  keys it averages): the released kernel adds this bias, so a pooled key weighs as the keys it
  stands for. The pattern is a :class:`~sparse_attn.compensated_pattern.CompensatedPattern`
  (exact lists: level 0; compensated lists: pooled levels), computed by the compensated
  backends (:mod:`sparse_attn.backends.triton_compensated`, its reference on CPU).

Defaults (the released code's configuration for Wan 2.1 14B at 720p, the Wan shape of
``benchmarks/spatial.py``): 128-token query and KV blocks (the API's ``block_q`` / ``block_k``
defaults), ``thresholds=(0.4, 0.5, 0.6, 0.8)`` (levels 0, 1, 2, 3 = pooling 1, 2, 4, 8, the
last 20 % of the mass skipped), ``min_full_fraction=0.06``, ``sample_stride=4``, tokens
reordered into 3D tiles of ``(2, 8, 8)`` (128 tokens: one tile per block).

Choices where the paper leaves room (the paper's full text was not available in this session:
the stored copies held the abstract and summaries of the method; the released code's
configuration file, level assignment and kernel were read for the thresholds, the sampling and
the ``ln`` bias, and nothing is copied from it):

- Sampling is deterministic (every ``sample_stride``-th token from each block's first) where the
  paper samples at random, so a pattern is reproducible.
- Token order: the layout's tile permutation (``tile``, default :func:`sparse_attn.layouts.default_tile`)
  where the released code orders tokens along a 3D Gilbert curve; both make spatio-temporal
  neighbourhoods contiguous blocks.
- The block that crosses a threshold is in the finer level (the released code likewise extends
  each level by one block), and the released code's alignment of level boundaries to its
  kernel tiles is not done (every block has its own level here).
- Pooled groups never cross a block (``block_k`` must be a multiple of ``2**levels``); the last
  group of the sequence averages its real positions and its bias is the log of their number
  (the released code pads by repeating the last token).
- The released code's optional key-similarity cap on the pooling level (off in its Wan 2.1 14B
  configuration) and its dense warm-up steps (a sampler schedule, not attention) are not included.
- Text tokens (``text_tokens=``): every query keeps the KV blocks holding text at level 0, as
  the released code does; text query blocks follow the rule.
- Importance in float32, per query head against its KV head (GQA without expanding K); lists
  per query head. Memory: one chunk of query blocks' sampled scores per head (within
  ``CHUNK_ELEMENTS``) and the ``(B, Hq, n_q, n_kv)`` int8 level map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..compensated_pattern import EXACT, MAX_POOL_LEVEL, SKIP, CompensatedPattern
from ..geometry import num_blocks
from ..layouts import Layout, default_tile
from ..ops._chunking import CHUNK_ELEMENTS
from ..registry import register_method
from ._spatial import check_grid_option, spatial_layout

__all__ = ["PsaConfig", "assign_levels", "block_importance", "sample_blocks", "text_key_blocks"]


@dataclass(frozen=True)
class PsaConfig:
    grid: tuple[int, ...] | None = None
    tile: tuple[int, ...] | None = None
    thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.8)
    min_full_fraction: float = 0.06
    sample_stride: int = 4
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        check_grid_option(self)
        thresholds = self.thresholds
        if not isinstance(thresholds, tuple) or not 1 <= len(thresholds) <= MAX_POOL_LEVEL + 1:
            raise ValueError(
                f"thresholds must be a tuple of 1 to {MAX_POOL_LEVEL + 1} cumulative-mass bounds (level 0, then "
                f"one per pooling level), got {thresholds!r}"
            )
        for value in thresholds:
            check_fraction("thresholds", value)
        if any(b < a for a, b in zip(thresholds, thresholds[1:], strict=False)):
            raise ValueError(f"thresholds must be non-decreasing, got {thresholds}")
        check_fraction("min_full_fraction", self.min_full_fraction, open_low=False)
        check_int("sample_stride", self.sample_stride)
        check_int("text_tokens", self.text_tokens, minimum=0)

    @property
    def levels(self) -> int:
        """Pooling levels used (the last is ``2**levels``)."""
        return len(self.thresholds) - 1


def text_key_blocks(layout: Layout, block_k: int, device) -> torch.Tensor:
    """Bool ``(n_kv,)``: the KV blocks (of the layout's tile order) holding at least one text token."""
    if not layout.text_tokens:
        return torch.zeros(num_blocks(layout.seq_len, block_k), dtype=torch.bool, device=device)
    positions = torch.arange(layout.seq_len, device=device)
    text = torch.nn.functional.pad(layout.is_text(positions), (0, (-layout.seq_len) % block_k))
    return text.view(-1, block_k).any(-1)


def sample_blocks(x: torch.Tensor, block: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``stride``-th row of each ``block`` of ``x`` ``(B, H, S, D)``: float32 ``(B, H, n, s, D)``
    (zeros past the end) and bool ``(n, s)`` whether the sample exists."""
    length = x.shape[2]
    n = num_blocks(length, block)
    offsets = torch.arange(0, block, stride, device=x.device)
    positions = torch.arange(n, device=x.device)[:, None] * block + offsets
    valid = positions < length
    rows = x[:, :, positions.clamp(max=length - 1).flatten()].float()
    rows = rows.view(*x.shape[:2], n, offsets.numel(), x.shape[3])
    return rows * valid[..., None], valid


def block_importance(sampled_q: torch.Tensor, q_valid: torch.Tensor, sampled_k: torch.Tensor, k_valid: torch.Tensor,
                     scale: float) -> torch.Tensor:  # fmt: skip
    """Float32 ``(B, H, c, n_kv)``: per (query block, KV block) the largest softmax probability among
    the sampled queries and keys (module docstring), from :func:`sample_blocks` of a chunk of query
    blocks (``(B, H, c, s_q, D)``, ``(c, s_q)``) and of the keys of the same heads (``(B, H, n_kv, s_k, D)``,
    ``(n_kv, s_k)``)."""
    scores = torch.matmul(sampled_q.flatten(2, 3), sampled_k.flatten(2, 3).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~k_valid.flatten(), float("-inf"))
    probabilities = torch.softmax(scores, dim=-1)
    probabilities = probabilities.view(*sampled_q.shape[:4], *k_valid.shape)  # (B, H, c, s_q, n_kv, s_k)
    probabilities = probabilities.masked_fill(~q_valid[:, :, None, None], 0.0)
    return probabilities.amax(dim=(3, 5))


def assign_levels(importance: torch.Tensor, thresholds: tuple[float, ...], min_full: int) -> torch.Tensor:
    """Int8 levels, ``importance``'s shape ``(..., n_kv)``: the threshold-bound rule of the module docstring."""
    mass = importance / importance.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    sorted_mass, order = torch.sort(mass, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sorted_mass, dim=-1) - sorted_mass
    bounds = torch.tensor(thresholds, dtype=before.dtype, device=before.device)
    level = (before[..., None] >= bounds).sum(-1)  # 0 .. len(thresholds); the last means skipped
    level = torch.where(level == len(thresholds), SKIP, level)
    rank = torch.arange(importance.shape[-1], device=importance.device)
    level = torch.where(rank < min_full, EXACT, level).to(torch.int8)
    return torch.empty_like(level).scatter_(-1, order, level)


@register_method(
    "psa",
    config=PsaConfig,
    paper="Li et al. 2025, PSA: Pyramid Sparse Attention for Efficient Video Understanding and Generation (arXiv:2512.04025)",
    summary="per query block: KV blocks ranked by sampled importance get pooling levels 1/2/4/8 by cumulative mass "
    "(0.4/0.5/0.6/0.8), rest skipped; pooled K/V with a ln(pool) bias",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: PsaConfig, *, causal: bool, block_q: int, block_k: int
) -> CompensatedPattern:
    """A :class:`CompensatedPattern` over the tile order; lists per query head, ``kv_counts`` int32
    ``(B, Hq, n_q_blocks)``. q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``."""
    tile = None
    if config.grid is not None:
        tile = config.tile if config.tile is not None else default_tile(len(Layout(config.grid).grid))
    layout = spatial_layout("psa", q, k, config, causal=causal, tile=tile)
    if block_k % (1 << config.levels):
        raise ValueError(
            f"psa pools KV blocks by up to {1 << config.levels} (thresholds={config.thresholds}): block_k={block_k} "
            f"must be a multiple of {1 << config.levels}"
        )
    q_tiles, k_tiles = layout.permute(q), layout.permute(k)
    batch, q_heads, seq, dim = q.shape
    group = q_heads // k.shape[1]
    n_q, n_kv = num_blocks(seq, block_q), num_blocks(seq, block_k)
    min_full = min(n_kv, int(config.min_full_fraction * n_kv) + 1)
    text = text_key_blocks(layout, block_k, q.device)
    levels = torch.empty((batch, q_heads, n_q, n_kv), dtype=torch.int8, device=q.device)
    sampled_q, q_valid = sample_blocks(q_tiles, block_q, config.sample_stride)
    sampled_k, k_valid = sample_blocks(k_tiles, block_k, config.sample_stride)
    per_block = 3 * batch * q_valid.shape[1] * k_valid.numel()  # scores, probabilities, their view
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // per_block)
    for head in range(q_heads):
        keys = sampled_k[:, head // group : head // group + 1]
        for first in range(0, n_q, blocks_per_chunk):
            rows = slice(first, min(n_q, first + blocks_per_chunk))
            chunk_q = sampled_q[:, head : head + 1, rows]
            importance = block_importance(chunk_q, q_valid[rows], keys, k_valid, dim**-0.5)
            chunk = assign_levels(importance, config.thresholds, min_full)
            levels[:, head : head + 1, rows] = chunk.masked_fill(text, EXACT)
    return CompensatedPattern.from_levels(
        levels, block_q=block_q, block_k=block_k, seq_q=seq, seq_k=seq, causal=False, layout=layout
    )
