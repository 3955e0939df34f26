"""PowerAttention: sinks + local window + KV blocks at power-of-two distances.

Paper: Lida Chen, Dong Xu, Chenxin An, Xintao Wang, Yikai Zhang, Jiangjie Chen, Zujie
Liang, Feng Wei, Jiaqing Liang, Yanghua Xiao, Wei Wang, "PowerAttention: Exponentially
Scaling of Receptive Fields for Effective Sparse Attention", 2025, arXiv:2503.03588.

Rule. Seen as a DAG over positions, a pattern whose edges join positions at power-of-two
distances reaches every earlier position within ``log2(n)`` hops with out-degree
``log2(n)``, so across ``d`` layers the receptive field covers ``2**d`` positions with no
holes (sliding windows grow linearly; dilated/LongNet patterns leave unreachable
positions). Applied at block granularity: query block ``i`` keeps the KV blocks at block
distance 1, 2, 4, 8, ... from its own block, plus the sink block(s) and a local window.
Per query block that is ``O(log n)`` blocks, the same for every head and every input.

Defaults: ``sink_tokens=256`` and ``local_tokens=1280``: the paper's efficiency setting
used 256-token blocks with one sink block and a 5-block local window beside the power
blocks (about 10 blocks per query block at 32K, the same budget as its sliding-window
baseline). That setting is taken from a summary of the paper's experiments; the method
section itself (Section 3.3, read directly) states only the power-of-two rule.

Choices: distances are counted in KV blocks of the ``block_k`` in use (the paper's mask
is a block-level rule), measured from the query block's own KV block(s), so with chunked
prefill they follow true positions. Non-causal mode: the rule is applied symmetrically
(blocks at power-of-two distances after the query block too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..ops.static_masks import block_distance, check_token_window, power_of_two_distance_mask, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class PowerConfig:
    sink_tokens: int = 256  # first keys every query keeps (attention sinks)
    local_tokens: int = 1280  # keys of the local window, the query's own block included

    def __post_init__(self) -> None:
        check_token_window(self.sink_tokens, self.local_tokens)


@register_method(
    "power",
    config=PowerConfig,
    paper="PowerAttention (Chen et al. 2025, arXiv:2503.03588)",
    summary="static: sinks + local window + blocks at power-of-two distances (log-depth receptive field)",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: PowerConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    window = dict(sink_tokens=config.sink_tokens, local_tokens=config.local_tokens)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        sink_local = token_window_mask(
            q, k, **window, block_q=block_q, block_k=block_k, causal=causal, q_blocks=q_blocks
        )
        distance = block_distance(seq_q, seq_k, block_q, block_k, q.device, q_blocks=q_blocks)
        return sink_local | power_of_two_distance_mask(distance)

    # One list shared by the whole batch and every head, built a chunk of query blocks at a time
    # (the int64 block distances are the largest table of a chunk).
    return stream_pattern(
        mask_rows, batch=1, heads=1, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal,
        device=q.device, row_elements=2 * num_blocks(seq_k, block_k), static=True,
    )  # fmt: skip
