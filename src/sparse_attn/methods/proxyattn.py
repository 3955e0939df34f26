"""ProxyAttn: pooled proxy heads rank blocks for all heads; each head gets its own block-aware budget.

Paper: Yixuan Wang, Huang He, Siqi Bao, Hua Wu, Haifeng Wang, Qingfu Zhu, Wanxiang Che,
"ProxyAttn: Guided Sparse Attention via Representative Heads", 2025, arXiv:2509.24745.

Selection rule:

1. Proxy scores. Heads are cut into ``proxy_heads`` groups of consecutive query heads; a
   group's proxy query is the mean of its heads' queries and its proxy key the mean of its
   KV heads' keys (with one group per KV head, the keys are exact). Because the head
   dimension is compressed instead of the sequence, the proxy scores tokens, not pooled
   blocks: for sampled query rows (every ``query_stride``-th row of each query block and
   its last row) the exact softmax over all keys is taken, and a block pair scores the
   largest share of attention any sampled row of the query block puts on the KV block.
2. Block-aware budgets. Each head estimates how many blocks it needs from its own cheap
   mean-pooled block distribution ``softmax(pool(Q) pool(K)^T / sqrt(D))``: per query block,
   the fewest blocks reaching ``gamma`` of the mass (at least ``min_blocks``).
3. Each head keeps, per query block, its budget of blocks ranked by its group's proxy
   scores. The diagonal is always kept.

Defaults and choices: ``proxy_heads=None`` (one proxy per KV head, i.e. per GQA group),
``query_stride=16``, ``gamma=0.9``, ``min_blocks=1``. The paper's own text was not available
while writing this; a third-party summary of it reports proxies formed per GQA key group
(their number chosen per model), a stride of 4 when scoring, max-pooling of token scores
into blocks (as here), gamma 0.9 or 0.95, and a minimum budget of 2048 tokens. Those values
are not adopted until checked against the paper: ``query_stride=16`` and ``min_blocks=1``
remain ours (the benchmarks and the H100 frontier ran with them). Aggregating token scores
into block scores by the maximum over a query block's sampled rows is our reading of
"token-level block estimation".

Operators: :mod:`sparse_attn.ops.sampled_rows` for the proxy scores (on CUDA, when the
sampled rows are every ``query_stride``-th query, i.e. block and sequence lengths are
multiples of it, the Triton scoring kernel: one pass, no full-resolution score rows in
memory; otherwise the PyTorch reference), :mod:`sparse_attn.ops.pooling` and
:mod:`sparse_attn.ops.selection` for the budgets and the ranking; proxy scores, budgets and
selection are computed one chunk of query blocks at a time and written into the pattern by
:func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..ops.pooling import PooledBlocks, block_softmax
from ..ops.sampled_rows import sampled_query_rows, sampled_rows_block_max_probs
from ..ops.selection import Budget, cumulative_mass_mask, topk_by_rank_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class ProxyAttnConfig:
    proxy_heads: int | None = None
    query_stride: int = 16
    gamma: float = 0.9
    min_blocks: int = 1

    def __post_init__(self) -> None:
        check_int("proxy_heads", self.proxy_heads, minimum=1, allow_none=True)
        check_int("query_stride", self.query_stride, minimum=1)
        check_fraction("gamma", self.gamma)
        check_int("min_blocks", self.min_blocks, minimum=1)


def proxy_queries_and_keys(q: torch.Tensor, k: torch.Tensor, proxy_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each group's query heads and of its KV heads: ``(B, P, Sq, D)``, ``(B, P or Hkv, Sk, D)``.

    When there are more proxies than KV heads, each proxy lies inside one KV head's group and
    the keys are returned as they are (``grouped_matmul`` pairs proxy ``p`` with KV head
    ``p // (P / Hkv)``).
    """
    batch, q_heads, seq_q, dim = q.shape
    kv_heads = k.shape[1]
    if q_heads % proxy_heads != 0 or (proxy_heads % kv_heads != 0 and kv_heads % proxy_heads != 0):
        raise ValueError(
            f"proxyattn needs proxy_heads ({proxy_heads}) to divide the query heads ({q_heads}) and to divide "
            f"or be a multiple of the KV heads ({kv_heads})"
        )
    proxy_q = q.reshape(batch, proxy_heads, q_heads // proxy_heads, seq_q, dim).mean(2)
    if proxy_heads >= kv_heads:
        return proxy_q, k
    proxy_k = k.reshape(batch, proxy_heads, kv_heads // proxy_heads, k.shape[2], dim).mean(2)
    return proxy_q, proxy_k


@register_method(
    "proxyattn",
    config=ProxyAttnConfig,
    paper="Wang et al. 2025, ProxyAttn: Guided Sparse Attention via Representative Heads (arXiv:2509.24745)",
    summary="pooled proxy heads score tokens for all heads; block-aware per-head budgets",
    head_local=lambda config: config.proxy_heads is None,  # one proxy per GQA group
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: ProxyAttnConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    q_heads = q.shape[1]
    proxy_heads = config.proxy_heads if config.proxy_heads is not None else k.shape[1]
    scale = q.shape[-1] ** -0.5

    rows = sampled_query_rows(seq_q, block_q, config.query_stride, q.device)
    proxy_q, proxy_k = proxy_queries_and_keys(q[:, :, rows], k, proxy_heads)
    pooled = PooledBlocks.of(q, k, block_q=block_q, block_k=block_k)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        proxy_scores = sampled_rows_block_max_probs(
            proxy_q,
            proxy_k,
            rows=rows,
            seq_q=seq_q,
            query_step=config.query_stride,
            block_q=block_q,
            block_k=block_k,
            scale=scale,
            causal=causal,
            q_blocks=q_blocks,
        )
        # Each query head ranks blocks by its group's proxy scores.
        ranking = proxy_scores.repeat_interleave(q_heads // proxy_heads, dim=1)
        del proxy_scores
        budget_probs = block_softmax(pooled.logits(scale=scale, causal=causal, q_blocks=q_blocks))
        budgets = cumulative_mass_mask(budget_probs, config.gamma, Budget(minimum=config.min_blocks)).sum(-1)
        del budget_probs
        return topk_by_rank_mask(ranking, budgets)

    return stream_pattern(
        mask_rows,
        batch=q.shape[0],
        heads=q_heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=q.shape[0] * q_heads * pooled.k.shape[2],
    )
