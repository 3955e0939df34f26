"""Vertical-slash: the last queries pick key columns and diagonals; keep the blocks they cross.

Paper: Huiqiang Jiang, Yucheng Li, Chengruidong Zhang, Qianhui Wu, Xufang Luo, Surin Ahn,
Zhenhua Han, Amir H. Abdi, Dongsheng Li, Chin-Yew Lin, Yuqing Yang, Lili Qiu, "MInference
1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse Attention", 2024,
arXiv:2407.02490 (the "Vertical-Slash" head pattern).

Selection rule (per query head): compute the exact causal softmax of the last ``last_q``
queries against every key; sum it over those queries per key (vertical lines) and per
diagonal, i.e. per distance ``query position - key position`` (slash lines); keep the
``vertical_size`` top columns and the ``slash_size`` top diagonals. Every block a kept line
crosses (a column at or before the query block's last query, or a diagonal joining one of
its queries to one of the block's keys) is computed. The diagonal block is always kept.

Defaults: ``last_q=64`` (the paper's value). The paper assigns each head its line counts
by an offline search over (vertical, slash) in {(30, 2048), (100, 1800), (500, 1500),
(3000, 200)} (its Table 7) on one calibration sample; there is no offline search here, so
one setting serves every head: ``vertical_size=1000``, ``slash_size=6096``, the setting the
authors' release gives heads without a searched configuration (a fact taken from their
release, not from the paper's text). Sizes are clamped to the sequence. Choice where the paper is
silent: MInference's kernel computes the lines at token granularity; a block-sparse
pattern computes every block a line crosses, so the computed set is a superset.

Operators: :mod:`sparse_attn.ops.last_query_probe` (the lines, ``O(S)`` per head),
:mod:`sparse_attn.ops.selection`, :mod:`sparse_attn.ops.vertical_slash_blocks`, the blocks
built per chunk of query blocks by :func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int
from ..geometry import num_blocks
from ..ops.last_query_probe import probe_last_queries
from ..ops.selection import topk_mask
from ..ops.to_pattern import stream_pattern
from ..ops.vertical_slash_blocks import vertical_slash_block_mask
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class VerticalSlashConfig:
    last_q: int = 64
    vertical_size: int = 1000
    slash_size: int = 6096

    def __post_init__(self) -> None:
        check_int("last_q", self.last_q, minimum=1)
        check_int("vertical_size", self.vertical_size, minimum=0)
        check_int("slash_size", self.slash_size, minimum=0)


@register_method(
    "vertical_slash",
    config=VerticalSlashConfig,
    paper="Jiang et al. 2024, MInference 1.0, vertical-slash head (arXiv:2407.02490)",
    summary="last 64 queries pick top key columns and diagonals; keep the blocks they cross",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: VerticalSlashConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    sums = probe_last_queries(
        q, k, num_queries=config.last_q, block_k=block_k, scale=q.shape[-1] ** -0.5, causal=causal
    )
    vertical = _top_lines(sums.vertical, config.vertical_size)
    slash = _top_lines(sums.slash, config.slash_size)
    geometry = dict(seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        return vertical_slash_block_mask(vertical, slash, **geometry, q_blocks=q_blocks)

    return stream_pattern(
        mask_rows,
        batch=q.shape[0],
        heads=q.shape[1],
        device=q.device,
        row_elements=q.shape[0] * q.shape[1] * num_blocks(seq_k, block_k),
        **geometry,
    )


def _top_lines(sums: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lines with the most mass, ignoring lines with none (bool, ``sums``' shape)."""
    if count == 0:
        return torch.zeros_like(sums, dtype=torch.bool)
    return topk_mask(sums, count) & (sums > 0)
