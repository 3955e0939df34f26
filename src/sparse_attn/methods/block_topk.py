"""Block top-k: mean-pooled block scores, the top blocks per query block (MInference's block-sparse head).

Paper: Huiqiang Jiang, Yucheng Li, Chengruidong Zhang, Qianhui Wu, Xufang Luo, Surin Ahn,
Zhenhua Han, Amir H. Abdi, Dongsheng Li, Chin-Yew Lin, Yuqing Yang, Lili Qiu, "MInference
1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024,
arXiv:2407.02490 (the "Block-Sparse" head pattern).

Selection rule (per query head): mean-pool queries and keys over each block, score every
block pair with ``softmax(pool(Q) pool(K)^T / sqrt(D))`` under the causal block mask, and
keep the ``top_k`` highest blocks of each query block. With ``threshold`` set, keep instead
the fewest blocks whose pooled probabilities reach ``threshold`` (cumulative mass), at most
``top_k``. The diagonal is always kept.

Defaults: ``top_k=100`` blocks, as in MInference (whose blocks are 64 tokens; here a block
is whatever ``block_k`` the caller uses, 128 by default, so the token budget doubles);
``threshold=None`` (pure top-k, the paper's rule). The cumulative-mass mode is our
addition, for budget-free comparisons with the other methods.

Operators: :mod:`sparse_attn.ops.pooling` (q and k pooled once), :mod:`sparse_attn.ops.selection`,
streamed over chunks of query blocks by :func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..ops.block_rows import QueryBlocks
from ..ops.pooling import PooledBlocks, block_softmax
from ..ops.selection import Budget, cumulative_mass_mask, topk_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class BlockTopKConfig:
    top_k: int = 100
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_int("top_k", self.top_k, minimum=1)
        check_fraction("threshold", self.threshold, allow_none=True)


@register_method(
    "block_topk",
    config=BlockTopKConfig,
    paper="Jiang et al. 2024, MInference 1.0, block-sparse head (arXiv:2407.02490)",
    summary="mean-pooled q·k block scores; top-k (or cumulative-mass) blocks per query block",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: BlockTopKConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    pooled = PooledBlocks.of(q, k, block_q=block_q, block_k=block_k)

    def mask_rows(q_blocks: QueryBlocks) -> torch.Tensor:
        logits = pooled.logits(scale=q.shape[-1] ** -0.5, causal=causal, q_blocks=q_blocks)
        if config.threshold is None:
            # Invalid (future) blocks sit at -inf and are ranked last; the pattern drops any that get picked.
            return topk_mask(logits, config.top_k)
        return cumulative_mass_mask(block_softmax(logits), config.threshold, Budget(maximum=config.top_k))

    return stream_pattern(
        mask_rows,
        batch=q.shape[0],
        heads=q.shape[1],
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=q.shape[0] * q.shape[1] * pooled.k.shape[2],
        block_lists=True,
    )
