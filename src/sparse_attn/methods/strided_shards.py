"""Strided shards: each query head attends a different strided shard of the past blocks
plus a local window (S2-Attention's heterogeneous context sharding).

Paper: Xihui Lin, Yunan Zhang, Suyu Ge, Liliang Ren, Barun Patra, Vishrav Chaudhary, Hao
Peng, Xia Song, "S2-Attention: Hardware-Aware Context Sharding Among Attention Heads",
2024, arXiv:2407.17678.

Rule. Heads share the work of covering the context instead of each reading all of it:
head ``h`` keeps, beyond its local window, one KV block in every ``stride`` ("vertical
stride"), namely the blocks ``j`` with ``j % stride == h % stride``. Any ``stride``
consecutive heads own disjoint shards whose union is the whole context, so the layer as
a whole still sees every block. Shards are fixed on absolute block numbers (the paper's
KV-cache-friendly choice: a block kept by a head is kept for every later query). Every
head also keeps the local window of ``local_tokens`` keys (ceil to blocks, diagonal
included). Density is about ``1 / stride`` plus the window.

Defaults: ``local_tokens=1024``, ``stride=8``: the local-stride pattern of the authors'
kernel library (github.com/linxihui/dkernel, as shipped in Phi-3-small: 16 local blocks of
64 tokens, vertical stride 8).

Choices: the shard unit is the ``block_k`` in use (the paper's sparse blocks are 64
tokens; at our default 128 the shards are 128-token blocks). The pattern is per *query*
head, so GQA groups do not share lists; with fewer than ``stride`` query heads the union
leaves some shards uncovered. No attention sinks (the paper's pattern has none beyond the
shards). Non-causal mode: the local window is symmetric, the shards unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks
from ..ops.static_masks import strided_shard_mask, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class StridedShardsConfig:
    local_tokens: int = 1024  # keys of the local window, the query's own block included
    stride: int = 8  # one KV block in every `stride` per head; `stride` heads cover the context

    def __post_init__(self) -> None:
        check_int("local_tokens", self.local_tokens, minimum=1)
        check_int("stride", self.stride, minimum=1)


@register_method(
    "strided_shards",
    config=StridedShardsConfig,
    paper="S2-Attention (Lin et al. 2024, arXiv:2407.17678)",
    summary="static, per query head: a strided shard of KV blocks + local window; heads jointly cover the context",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: StridedShardsConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    shards = strided_shard_mask(q.shape[1], n_kv, config.stride, q.device)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        local = token_window_mask(
            q,
            k,
            sink_tokens=0,
            local_tokens=config.local_tokens,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            q_blocks=q_blocks,
        )
        return local[None] | shards

    # One list per query head, shared by the batch, built a chunk of query blocks at a time.
    return stream_pattern(
        mask_rows,
        batch=1,
        heads=q.shape[1],
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=2 * q.shape[1] * n_kv,
    )
