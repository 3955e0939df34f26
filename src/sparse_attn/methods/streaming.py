"""Streaming: attention sinks plus a local window (StreamingLLM, MInference's "A-shape").

Paper: Guangxuan Xiao, Yuandong Tian, Beidi Chen, Song Han, Mike Lewis, "Efficient
Streaming Language Models with Attention Sinks", 2023, arXiv:2309.17453. Used as a static
prefill pattern ("A-shape") by MInference 1.0 (Jiang et al. 2024, arXiv:2407.02490) and
SCBench (Li et al. 2024, arXiv:2412.10319).

Rule. Every query block keeps the KV blocks holding the first ``sink_tokens`` keys (the
attention sinks, which soak up attention mass whatever their content) and the blocks of
the last ``local_tokens`` keys before it (its own diagonal block(s) included). Token
sizes become blocks by ceil: ``ceil(sink_tokens / block_k)`` sink blocks and a window of
``ceil(local_tokens / block_k)`` blocks counting the diagonal.

Defaults: ``sink_tokens=128``, ``local_tokens=3968``, the A-shape / StreamingLLM setting of
MInference and SCBench (``n_init=128``, ``n_local=3968``: a 4K budget; the StreamingLLM
paper itself keeps 4 sink tokens, which MInference rounds up to one block of 128).

Choices where the papers are silent: the window is counted from the query block's first
own KV block, so every query of the block sees at least ``local_tokens - block_k`` keys
back; with queries that are the last ``seq_q`` positions (chunked prefill) the window is
measured from their true positions. Non-causal mode: the window is symmetric (the same
number of blocks after the query block), the sinks unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..geometry import num_blocks
from ..ops.static_masks import check_token_window, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class StreamingConfig:
    sink_tokens: int = 128  # first keys every query keeps (attention sinks)
    local_tokens: int = 3968  # keys of the local window, the query's own block included

    def __post_init__(self) -> None:
        check_token_window(self.sink_tokens, self.local_tokens)


@register_method(
    "streaming",
    config=StreamingConfig,
    paper="StreamingLLM (Xiao et al. 2023, arXiv:2309.17453); A-shape in MInference (arXiv:2407.02490)",
    summary="static: sink blocks + local window (A-shape)",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: StreamingConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    window = dict(sink_tokens=config.sink_tokens, local_tokens=config.local_tokens)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        return token_window_mask(q, k, **window, block_q=block_q, block_k=block_k, causal=causal, q_blocks=q_blocks)

    # One list shared by the whole batch and every head, built a chunk of query blocks at a time.
    return stream_pattern(
        mask_rows,
        batch=1,
        heads=1,
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=2 * num_blocks(k.shape[2], block_k),
        static=True,
    )
