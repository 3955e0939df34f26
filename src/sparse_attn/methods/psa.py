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
- Importance per query head against its KV head (GQA without expanding K), float32 logits on
  CPU, the input dtype with float32 accumulation in the Triton kernel on CUDA; lists per query
  head. Memory: the sampled q/k (a quarter of q and k at the default stride), one chunk
  of query blocks' ``(B, Hq, rows, n_kv)`` importance map (within ``CHUNK_ELEMENTS``; the
  reference of :mod:`sparse_attn.ops.pooled_attention_map` bounds its own logits likewise) and
  the ``(B, Hq, n_q, n_kv)`` int8 level map. ``block_q`` and ``block_k`` must be multiples of
  ``sample_stride``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..compensated_pattern import EXACT, MAX_POOL_LEVEL, SKIP, CompensatedPattern
from ..geometry import num_blocks
from ..layouts import Layout, default_tile
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops.pooled_attention_map import pooled_attention_map
from ..registry import register_method
from ._spatial import check_grid_option, spatial_layout

__all__ = ["PsaConfig", "assign_levels", "block_importance", "text_key_blocks"]


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


def block_importance(
    sampled_q: torch.Tensor, sampled_k: torch.Tensor, block_q: int, block_k: int, scale: float, rows: range
) -> torch.Tensor:
    """Float32 ``(B, Hq, len(rows), n_kv)``: per (query block, KV block) of the sampled tokens the
    largest softmax probability (each sampled query's softmax over every sampled key), divided by
    its row's sum over the KV blocks: :func:`sparse_attn.ops.pooled_attention_map` (a Triton kernel
    on CUDA), whose row normalisation does not change the levels (:func:`assign_levels` ranks each
    row's shares of its sum)."""
    return pooled_attention_map(sampled_q, sampled_k, block_q=block_q, block_k=block_k, scale=scale, causal=False,
                                q_blocks=rows)  # fmt: skip


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
    stride = config.sample_stride
    if block_q % stride or block_k % stride:
        raise ValueError(
            f"psa samples every {stride}-th token of each block (sample_stride={stride}): block_q={block_q} and "
            f"block_k={block_k} must be multiples of it"
        )
    # Every stride-th token of the sequence is every stride-th token of each block (blocks are
    # multiples of the stride), so the sampled blocks are blocks of block / stride samples.
    sampled_q, sampled_k = layout.permute(q)[:, :, ::stride], layout.permute(k)[:, :, ::stride]
    batch, q_heads, seq, dim = q.shape
    n_q, n_kv = num_blocks(seq, block_q), num_blocks(seq, block_k)
    min_full = min(n_kv, int(config.min_full_fraction * n_kv) + 1)
    text = text_key_blocks(layout, block_k, q.device)
    levels = torch.empty((batch, q_heads, n_q, n_kv), dtype=torch.int8, device=q.device)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // (4 * batch * q_heads * n_kv))
    for first in range(0, n_q, rows_per_chunk):
        rows = range(first, min(n_q, first + rows_per_chunk))
        importance = block_importance(sampled_q, sampled_k, block_q // stride, block_k // stride, dim**-0.5, rows)
        levels[:, :, first : rows.stop] = assign_levels(importance, config.thresholds, min_full).masked_fill(
            text, EXACT
        )
    return CompensatedPattern.from_levels(
        levels, block_q=block_q, block_k=block_k, seq_q=seq, seq_k=seq, causal=False, layout=layout
    )
