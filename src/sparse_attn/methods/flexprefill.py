"""FlexPrefill: per head, pick query-aware or vertical-slash by JS divergence, then cover mass gamma.

Paper: Xunhao Lai, Jianqiao Lu, Yao Luo, Yiyuan Ma, Xun Zhou, "FlexPrefill: A Context-Aware
Sparse Attention Mechanism for Efficient Long-Sequence Inference", ICLR 2025, arXiv:2502.20766.

Selection rule (per query head):

1. Pattern choice. Take the last ``block_q`` queries. Their true block distribution is the
   exact softmax against every key, summed per KV block; the estimated one is
   ``softmax(mean(Q_last) · pool(K)^T / sqrt(D))`` over mean-pooled key blocks. If the
   Jensen-Shannon distance ``sqrt(JSD)`` between them is below ``tau`` the pooled estimate is
   trusted and the head is *query-aware*; otherwise it is *vertical-slash*.
2. Query-aware heads: block probabilities ``softmax(pool(Q) pool(K)^T / sqrt(D))`` per query
   block; over the whole head (all query blocks together, each row normalized to 1) keep
   the fewest blocks whose probabilities reach ``gamma`` of the total.
3. Vertical-slash heads: from the same last-query softmax, the vertical (per key) and slash
   (per distance) sums, each normalized; keep the fewest columns and the fewest diagonals
   reaching ``gamma`` each, and every block they cross.
4. Budget: each head keeps at least ``min_budget`` tokens' worth: ``min_budget`` columns
   and ``min_budget`` diagonals for vertical-slash heads, ``ceil(min_budget / block_k)``
   top-pooled blocks per query block for query-aware heads. The diagonal is always kept.

Defaults: ``gamma=0.9``, ``tau=0.1``, ``min_budget=1024`` (the paper's defaults; its blocks
are 128 tokens, like ours). Choices where the paper is silent: the divergence uses natural
logarithms; the minimum budget is applied per line set (vertical-slash) and per query
block (query-aware) as stated above.

Streaming: the query-aware rule selects over all of a head's blocks at once, so this estimator
streams by query heads (:func:`sparse_attn.ops.to_pattern.stream_pattern_by_heads`): each chunk
of heads (as many as the chunk budget holds, at least one) is scored, selected and written into
the pattern before the next. Its working set is a few float32 ``(n_q, n_kv)`` tables of the
chunk's heads, never of every head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..geometry import num_blocks
from ..ops.gqa import grouped_matmul
from ..ops.last_query_probe import ProbeSums, probe_last_queries
from ..ops.pooling import PooledBlocks, block_softmax, mean_pool_blocks
from ..ops.selection import Budget, cumulative_mass_mask, topk_mask
from ..ops.to_pattern import stream_pattern_by_heads
from ..ops.vertical_slash_blocks import vertical_slash_block_mask
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class FlexPrefillConfig:
    gamma: float = 0.9
    tau: float = 0.1
    min_budget: int = 1024  # tokens

    def __post_init__(self) -> None:
        check_fraction("gamma", self.gamma)
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise TypeError(f"tau must be a float, got {type(self.tau).__name__}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1] (a Jensen-Shannon distance), got {self.tau}")
        check_int("min_budget", self.min_budget, minimum=0)


def jensen_shannon_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``sqrt(JSD(p, q))`` in nats over the last dim; p and q are distributions (float32)."""
    middle = 0.5 * (p + q)

    def kl_to_middle(x: torch.Tensor) -> torch.Tensor:
        ratio = torch.where(x > 0, x / middle.clamp_min(1e-30), torch.ones_like(x))
        return (x * torch.log(ratio)).sum(-1)

    divergence = 0.5 * kl_to_middle(p) + 0.5 * kl_to_middle(q)
    return divergence.clamp_min(0.0).sqrt()


def pooled_last_block_distribution(q: torch.Tensor, k: torch.Tensor, *, num_queries: int, block_k: int) -> torch.Tensor:
    """``softmax(mean(last queries) · pool(K)^T / sqrt(D))``, float32 ``(B, Hq, n_kv)``.

    The last query sees every key, so no block is masked.
    """
    last = q[:, :, q.shape[2] - min(num_queries, q.shape[2]) :].float().mean(2, keepdim=True)
    logits = grouped_matmul(last, mean_pool_blocks(k, block_k)).squeeze(2) * q.shape[-1] ** -0.5
    return torch.softmax(logits, dim=-1)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum(-1, keepdim=True).clamp_min(1e-30)


@register_method(
    "flexprefill",
    config=FlexPrefillConfig,
    paper="Lai et al. 2025, FlexPrefill: A Context-Aware Sparse Attention Mechanism (arXiv:2502.20766)",
    summary="per head JS divergence picks query-aware vs vertical-slash; fewest blocks covering gamma",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: FlexPrefillConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    probe = probe_last_queries(q, k, num_queries=block_q, block_k=block_k, scale=scale, causal=causal)
    estimated = pooled_last_block_distribution(q, k, num_queries=block_q, block_k=block_k)
    true_blocks = probe.block / probe.num_queries
    query_aware = jensen_shannon_distance(true_blocks, estimated) < config.tau  # (B, Hq)
    # The lines of every head are O(S); their blocks are built per chunk of heads, like the
    # query-aware masks, and only for chunks where some head takes them.
    # Which heads are query-aware, on the host once (one synchronisation, not two per head chunk).
    aware_heads = query_aware.any(0).tolist()
    every_aware = query_aware.all(0).tolist()
    lines = None if all(every_aware) else _selected_lines(probe, config)
    del probe, true_blocks, estimated
    pooled = PooledBlocks.of(q, k, block_q=block_q, block_k=block_k)
    geometry = {"seq_q": seq_q, "seq_k": seq_k, "block_q": block_q, "block_k": block_k, "causal": causal}

    def mask_heads(heads: range) -> torch.Tensor:
        aware_here = query_aware[:, heads.start : heads.stop]
        aware = (
            _query_aware_mask(pooled, config, scale=scale, causal=causal, heads=heads)
            if any(aware_heads[heads.start : heads.stop])
            else None
        )
        crossed = None
        if not all(every_aware[heads.start : heads.stop]):
            vertical, slash = (line[:, heads.start : heads.stop] for line in lines)
            crossed = vertical_slash_block_mask(vertical, slash, **geometry)
        if aware is None or crossed is None:
            return crossed if aware is None else aware
        return torch.where(aware_here[..., None, None], aware, crossed)

    return stream_pattern_by_heads(
        mask_heads,
        batch=q.shape[0],
        heads=q.shape[1],
        group=q.shape[1] // k.shape[1],
        device=q.device,
        head_elements=q.shape[0] * pooled.q.shape[2] * pooled.k.shape[2],
        **geometry,
    )


def _query_aware_mask(
    pooled: PooledBlocks, config: FlexPrefillConfig, *, scale: float, causal: bool, heads: range
) -> torch.Tensor:
    """Per head of ``heads``, the fewest pooled blocks covering ``gamma`` of the head's mass, plus the minimum budget."""
    logits = pooled.logits(scale=scale, causal=causal, heads=heads)
    probs = block_softmax(logits)
    min_blocks = num_blocks(config.min_budget, pooled.block_k)
    floor = topk_mask(logits, min_blocks) if min_blocks > 0 else None
    del logits
    mask = cumulative_mass_mask(probs.flatten(-2), config.gamma).view(probs.shape)
    del probs
    return mask if floor is None else mask | floor


def _selected_lines(probe: ProbeSums, config: FlexPrefillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head, the fewest columns and the fewest diagonals covering ``gamma`` each (at least ``min_budget``).

    Bool ``(B, Hq, Sk)`` each: the vertical and slash lines whose blocks vertical-slash heads keep.
    """
    line_budget = Budget(minimum=config.min_budget)
    vertical = cumulative_mass_mask(_normalized(probe.vertical), config.gamma, line_budget) & (probe.vertical > 0)
    slash = cumulative_mass_mask(_normalized(probe.slash), config.gamma, line_budget) & (probe.slash > 0)
    return vertical, slash
