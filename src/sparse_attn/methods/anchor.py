"""AnchorAttention: keys whose pooled-query score comes within ``theta`` of an anchor, shared by a step of query blocks.

Paper: Yu Zhang, Dong Guo, Fang Wu, Lu Tang, Guoliang Zhu, Dian Ding, Yiming Zhang,
"AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity", 2025,
arXiv:2505.23520.

Rule (per query head):

1. Anchor (pattern-based anchor computation): each query row's largest scaled logit
   ``max(q · [K_init, K_window]) / sqrt(D)`` over the initial keys and its local window, which
   hold the largest scores of almost every row; the anchor of a query block is the mean of
   its rows' maxima.
2. Stripes (difference-aware identification): the block's mean-pooled query scores every
   earlier key, ``mean(Q_block) · k / sqrt(D)``; a key is selected (a vertical stripe) when its
   score comes within ``theta`` of the anchor: ``score >= anchor - theta``.
3. Stripes are shared by ``step`` consecutive query blocks (the union of their selections),
   which also compute their own region densely: every key from the first query of their step
   group up to the diagonal, plus the initial keys.

Defaults: ``theta=12`` (natural-log units of the scaled logits), ``step=16`` query blocks,
``init_tokens=128`` and ``local_tokens=128`` (the initial block and the query's own block at
the paper's block size of 128): the released configuration. Choices where the paper leaves
room or where this engine differs:

- Granularity: AnchorAttention computes the selected keys one by one (a gather kernel); a
  block-sparse pattern computes whole KV blocks, so a block is kept when it holds at least one
  selected stripe. The result is a superset of the paper's keys (the same recall or more, at
  a higher density): recall is exact, speed is block-granular.
- The anchor region in the paper's formula is the initial keys and the local window; its
  released PyTorch reference uses the first block and the query block's own block, its
  fused kernel the whole first and own step groups. We follow the reference
  (``init_tokens`` and ``local_tokens`` expose the choice, in tokens, ceil to blocks).
- Step groups are aligned to the first query block; the last group may be shorter. With
  ``Sq < Sk`` the groups are over the query blocks of the call.
- A pooled query's stripe scores are causally masked at the block's last query.
- GQA: lists per query head (each query head pools its own queries).
- ``causal=False`` (not in the paper): keys after the block are scored too; the dense
  region is the step group's own blocks and the window is symmetric.

Operators: :mod:`sparse_attn.ops.anchor_region` (row maxima), :mod:`sparse_attn.ops.pooling`
(pooled queries), :mod:`sparse_attn.ops.block_max` (each pooled query's best stripe per KV
block), :mod:`sparse_attn.ops.static_masks`, streamed a chunk of whole step groups at a time
by :func:`sparse_attn.ops.to_pattern.stream_pattern` (``rows_multiple=step``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks, own_kv_block_span, query_block_positions
from ..ops.anchor_region import anchor_region_stats, region_blocks
from ..ops.block_max import block_max_logits
from ..ops.block_rows import QueryBlocks, query_block_index, query_block_rows
from ..ops.pooling import mean_pool_blocks
from ..ops.static_masks import check_token_window, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class AnchorConfig:
    theta: float = 12.0
    step: int = 16
    init_tokens: int = 128
    local_tokens: int = 128

    def __post_init__(self) -> None:
        if isinstance(self.theta, bool) or not isinstance(self.theta, (int, float)):
            raise TypeError(f"theta must be a float, got {type(self.theta).__name__}")
        if not self.theta >= 0.0 or self.theta == float("inf"):
            raise ValueError(f"theta must be a finite number >= 0, got {self.theta}")
        check_int("step", self.step, minimum=1)
        check_int("init_tokens", self.init_tokens, minimum=1)
        check_token_window(self.init_tokens, self.local_tokens, sink_name="init_tokens")


def step_group_region(
    seq_q: int, seq_k: int, block_q: int, block_k: int, rows: QueryBlocks, step: int, causal: bool, device
) -> torch.Tensor:
    """Bool ``(len(rows), n_kv)``: the KV blocks from each query block's step-group start to its own blocks.

    In causal mode the builder drops blocks after the diagonal; without it the group's own
    blocks (through the group's last query block) are kept.
    """
    first, last = own_kv_block_span(seq_q, seq_k, block_q, block_k, device)
    n_q = num_blocks(seq_q, block_q)
    block = query_block_index(rows, device)
    group_first = first[(block // step) * step]
    group_last = last[torch.clamp((block // step + 1) * step, max=n_q) - 1]
    kv_block = torch.arange(num_blocks(seq_k, block_k), device=device)[None, :]
    end = last[block] if causal else group_last
    return (kv_block >= group_first[:, None]) & (kv_block <= end[:, None])


@register_method(
    "anchor",
    config=AnchorConfig,
    paper="Zhang et al. 2025, AnchorAttention: Difference-Aware Sparse Attention with Stripe Granularity "
    "(arXiv:2505.23520)",
    summary="anchor = max score over initial+local keys; keep blocks holding keys within theta of it "
    "(pooled queries), shared by a step of query blocks",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: AnchorConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Lists per query head: ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``."""
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    scale = q.shape[-1] ** -0.5
    n_kv = num_blocks(seq_k, block_k)
    pooled_q = mean_pool_blocks(q, block_q) * scale
    _, block_ends = query_block_positions(seq_q, seq_k, block_q, q.device)
    region = region_blocks(config.init_tokens, config.local_tokens, block_k, seq_k)

    def mask_rows(rows: QueryBlocks) -> torch.Tensor:
        # A tuple of blocks (capture_rows: whole step groups, ascending, so only the sequence's last
        # block can be partial and it comes last): the region statistics per run of consecutive
        # blocks, everything else at once.
        row_max = torch.cat(
            [
                anchor_region_stats(
                    q, k, block_q=block_q, block_k=block_k, scale=scale, causal=causal, q_blocks=run, **region
                ).row_max
                for run in _runs(rows)
            ],
            dim=-1,
        )
        # The anchor of a query block: the mean of its rows' maxima (a last partial block: its real rows).
        maxima = torch.nn.functional.pad(row_max, (0, len(rows) * block_q - row_max.shape[-1]))
        blocks = query_block_index(rows, q.device)
        real_rows = torch.clamp(seq_q - blocks * block_q, max=block_q)
        anchors = maxima.view(batch, q_heads, len(rows), block_q).sum(-1) / real_rows
        stripes = block_max_logits(
            query_block_rows(pooled_q, rows, dim=2),
            k,
            block_k=block_k,
            q_positions=query_block_rows(block_ends, rows) if causal else None,
        )
        selected = stripes >= (anchors - config.theta)[..., None]
        del stripes
        # The union over each step group (the chunk holds whole groups).
        groups = -(-len(rows) // config.step)
        padded = torch.nn.functional.pad(selected, (0, 0, 0, groups * config.step - len(rows)), value=False)
        shared = padded.view(batch, q_heads, groups, config.step, n_kv).any(dim=3, keepdim=True)
        selected = shared.expand(-1, -1, -1, config.step, -1).reshape(batch, q_heads, -1, n_kv)[:, :, : len(rows)]
        dense = step_group_region(seq_q, seq_k, block_q, block_k, rows, config.step, causal, q.device)
        sinks = token_window_mask(
            q,
            k,
            sink_tokens=config.init_tokens,
            local_tokens=1,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            q_blocks=rows,
        )
        return selected | dense | sinks

    # Chunks of whole step groups, sized by the block maxima and the masks (float32 and bool rows of
    # n_kv per query block and head); the region's logits are chunked inside anchor_region_stats.
    return stream_pattern(
        mask_rows,
        batch=batch,
        heads=q_heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=batch * q_heads * 2 * n_kv,
        rows_multiple=config.step,
        block_lists=True,
    )


def _runs(rows: QueryBlocks) -> list[range]:
    """``rows`` as maximal runs of consecutive ascending blocks (a range is one run)."""
    if isinstance(rows, range):
        return [rows]
    runs, start = [], 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i] != rows[i - 1] + 1:
            runs.append(range(rows[start], rows[i - 1] + 1))
            start = i
    return runs
