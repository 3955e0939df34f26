"""Tri-shape: the A-shape (sinks + local window) plus dense rows for the last queries.

Paper: Yucheng Li, Huiqiang Jiang, Qianhui Wu, Xufang Luo, Surin Ahn, Chengruidong Zhang,
Amir H. Abdi, Dongsheng Li, Jianfeng Gao, Yuqing Yang, Lili Qiu, "SCBench: A KV
Cache-Centric Analysis of Long-Context Methods", 2024, arXiv:2412.10319.

Rule. Every query block keeps the A-shape of :mod:`.streaming` (the first ``sink_tokens``
keys and a local window of ``local_tokens`` keys, converted to blocks by ceil); the query
blocks that hold any of the last ``last_q_tokens`` queries keep every valid block. The
last queries (typically the question at the end of a prompt) thus read the whole context,
which the paper finds recovers much of A-shape's loss on the first turn.

Defaults: ``sink_tokens=128``, ``local_tokens=3968``, ``last_q_tokens=100``, SCBench's
released Tri-shape setting (``n_init=128``, ``n_local=3968``, ``n_last=100``).

Choices where the paper is silent: the dense rows are found from token positions, so a
partial last query block counts its real rows (100 queries may span two blocks); with
chunked prefill (queries are the last ``seq_q`` of ``seq_k`` positions) "the last
queries" are those of this call. Non-causal mode: the A-shape window is symmetric and the
dense rows see every block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks, query_block_positions
from ..ops.static_masks import check_token_window, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class TriShapeConfig:
    sink_tokens: int = 128  # first keys every query keeps (attention sinks)
    local_tokens: int = 3968  # keys of the local window, the query's own block included
    last_q_tokens: int = 100  # the last queries, which attend densely

    def __post_init__(self) -> None:
        check_token_window(self.sink_tokens, self.local_tokens)
        check_int("last_q_tokens", self.last_q_tokens, minimum=0)


def last_query_block_rows(seq_q: int, block_q: int, last_q_tokens: int, device=None) -> torch.Tensor:
    """Bool ``(n_q_blocks,)``: query blocks holding at least one of the last ``last_q_tokens`` queries."""
    first_dense_row = seq_q - min(last_q_tokens, seq_q)
    _, last_row = query_block_positions(seq_q, seq_q, block_q, device)
    return last_row >= first_dense_row


@register_method(
    "tri_shape",
    config=TriShapeConfig,
    paper="SCBench (Li et al. 2024, arXiv:2412.10319)",
    summary="static: A-shape (sinks + local window) + dense last query blocks",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: TriShapeConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    window = dict(sink_tokens=config.sink_tokens, local_tokens=config.local_tokens)
    dense_rows = last_query_block_rows(seq_q, block_q, config.last_q_tokens, q.device)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        a_shape = token_window_mask(q, k, **window, block_q=block_q, block_k=block_k, causal=causal, q_blocks=q_blocks)
        # The pattern drops the dense rows' future blocks in causal mode.
        return a_shape | dense_rows[q_blocks.start : q_blocks.stop, None]

    # One list shared by the whole batch and every head, built a chunk of query blocks at a time.
    return stream_pattern(
        mask_rows, batch=1, heads=1, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal,
        device=q.device, row_elements=2 * num_blocks(seq_k, block_k), static=True,
    )  # fmt: skip
