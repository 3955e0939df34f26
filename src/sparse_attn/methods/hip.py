"""HiP: hierarchically pruned attention, a tree search for each query block's top-k keys.

Paper: Heejun Lee, Geon Park, Youngwan Lee, Jaduk Suh, Jina Kim, Wonyong Jeong, Bumsik Kim,
Hyemin Lee, Myeongjae Jeon, Sung Ju Hwang, "A Training-Free Sub-quadratic Cost Transformer
Model Serving Framework With Hierarchically Pruned Attention" (HiP Attention), 2024,
arXiv:2406.09827.

Rule (per query head and query block; "attention locality": neighbouring keys score alike):

1. Cut the keys a query block may see into ``2k`` equal chunks.
2. Score each chunk by its representative (its centre unit of keys): the largest ``q · k``
   between the block's queries and the representative's keys.
3. Keep the ``k`` best chunks, split each in two (``2k`` chunks again), and repeat until every
   kept chunk is one unit; those ``k`` units are the block's keys. About ``log2(S / k)``
   rounds, each scoring ``2k`` representatives: ``O(S log S)`` work, no ``O(S^2)`` scores.
4. The first ``sink_tokens`` keys and a sliding window of ``window_tokens`` are always kept.

Defaults: ``top_k_tokens=512`` (the paper's ``k = 512``), ``sink_tokens=16`` and
``window_tokens=128`` (the released code's sink and sliding-window defaults). Choices where
this engine differs or the paper is silent:

- Granularity: HiP's units are key blocks of ``b_k = 2`` tokens for query blocks of
  ``b_q = 32``; here the unit is a whole KV block of the pattern (``block_k``) and the query
  block is ``block_q``, so ``k = ceil(top_k_tokens / block_k)`` KV blocks are searched for
  (4 at the default 128). The kept keys are whole blocks: a coarser, larger set than the
  paper's for the same ``top_k_tokens``.
- The search runs over the KV blocks before the query block's own ones (causal; its own
  blocks are kept anyway); a query block that sees at most ``k`` of them keeps them all
  (each initial chunk then holds at most one).
- Chunks split at ``ceil(size / 2)``; a chunk's representative is its unit at
  ``start + size // 2``; ties in the top-k go to the earlier chunk. An empty half never wins.
- The representative's score is exact (products of q and k in their own dtype, accumulated in
  float32; queries unscaled, since only maxima are compared), not the SparQ approximation of
  the released kernels. Only the representatives' keys are read, straight from ``k``: no
  float32 copy of K.
- Not verified against the paper text in this session: the stored copies reachable held its
  abstract and summaries; the rule above follows them and the released code's defaults.
- ``causal=False`` (not in the paper): every block outside the query block's own span is a
  candidate and the window is symmetric.

Operators: :func:`sparse_attn.ops.gathered_block_max.gathered_block_max` (the representatives'
scores), :func:`sparse_attn.ops.selection.topk_mask`, :mod:`sparse_attn.ops.static_masks`, streamed over chunks of query blocks by :func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks, own_kv_block_span
from ..ops.block_rows import QueryBlocks, query_block_rows
from ..ops.gathered_block_max import gathered_block_max
from ..ops.selection import topk_mask
from ..ops.static_masks import token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class HipConfig:
    top_k_tokens: int = 512
    sink_tokens: int = 16
    window_tokens: int = 128

    def __post_init__(self) -> None:
        check_int("top_k_tokens", self.top_k_tokens, minimum=1)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        check_int("window_tokens", self.window_tokens, minimum=1)


@register_method(
    "hip",
    config=HipConfig,
    paper="Lee et al. 2024, HiP Attention: hierarchically pruned attention (arXiv:2406.09827)",
    summary="per query block a tree search: 2k chunks scored by their centre block, keep k, halve, repeat; "
    "+ sinks and a sliding window",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: HipConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Lists per query head: ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``."""
    batch, q_heads, seq_q = q.shape[:3]
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    # More than every block is every block (and 2 * keep chunks are allocated per query block).
    keep = min(num_blocks(config.top_k_tokens, block_k), n_kv)
    first_own, last_own = own_kv_block_span(seq_q, seq_k, block_q, block_k, q.device)

    def mask_rows(q_blocks: QueryBlocks) -> torch.Tensor:
        rows = len(q_blocks)
        own_first = query_block_rows(first_own, q_blocks)
        own_size = query_block_rows(last_own, q_blocks) - own_first + 1
        # Candidates: the blocks outside the own span, numbered 0..n-1 in order.
        candidates = own_first if causal else n_kv - own_size

        def to_block(index: torch.Tensor) -> torch.Tensor:
            return index + (index >= own_first[:, None]) * own_size[:, None]

        chunk = torch.arange(2 * keep, device=q.device)
        lo = (chunk[None, :] * candidates[:, None]) // (2 * keep)
        hi = ((chunk[None, :] + 1) * candidates[:, None]) // (2 * keep)
        lo, hi = (x.expand(batch, q_heads, rows, 2 * keep) for x in (lo, hi))
        while True:
            present = hi > lo
            units = to_block(lo + (hi - lo) // 2)
            scores = gathered_block_max(q, k, units, present, q_blocks=q_blocks, block_q=block_q, block_k=block_k)
            kept = topk_mask(scores, keep) & present
            order = torch.argsort((~kept).to(torch.uint8), dim=-1, stable=True)[..., :keep]
            lo, hi = torch.gather(lo, -1, order), torch.gather(hi, -1, order)
            if int((hi - lo).max()) <= 1:
                break
            middle = (lo + hi + 1) // 2
            lo, hi = torch.cat([lo, middle], -1), torch.cat([middle, hi], -1)
        chosen = torch.zeros(batch, q_heads, rows, n_kv + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(-1, torch.where(hi > lo, to_block(lo), n_kv), True)
        mask = chosen[..., :n_kv]
        window = token_window_mask(
            q,
            k,
            sink_tokens=config.sink_tokens,
            local_tokens=config.window_tokens,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            q_blocks=q_blocks,
        )
        return mask | window

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
        # Per query block and head: the search state, a few int64 (and float32 score) tensors of
        # 2k chunks (two float32 units per int64 entry; 32 units per kept block covers about eight
        # of them), and the bool mask rows with their copies (one unit per KV block). The scoring
        # operator holds no scratch of its own (its reference chunks under CHUNK_ELEMENTS).
        row_elements=batch * q_heads * (32 * keep + n_kv),
        block_lists=True,
    )
