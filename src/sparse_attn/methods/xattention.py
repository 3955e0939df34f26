"""XAttention: block importance from strided antidiagonal sums, threshold selection per query block.

Paper: Ruyi Xu, Guangxuan Xiao, Haofeng Huang, Junxian Guo, Song Han, "XAttention: Block
Sparse Attention with Antidiagonal Scoring", 2025, arXiv:2503.16428.

Selection rule (per query head):

1. Cut queries and keys into cells of ``stride`` positions. A cell pair scores the sum of
   the ``stride`` products on its antidiagonal (lower-left to upper-right); every query and
   every key takes part in exactly one antidiagonal per cell pair, and antidiagonals cross
   both vertical and slash lines, so neither is missed.
2. Softmax each query cell's scores over its visible key cells, sum them per
   ``(query block, KV block)`` and normalize, giving each query block a distribution over
   KV blocks.
3. Per query block keep the fewest KV blocks whose probabilities sum to ``threshold``
   (largest first). The first KV block (attention sinks) and the diagonal are always kept.

Defaults: ``stride=8``, ``threshold=0.9`` (the paper's main setting). Choices where the
paper is silent: antidiagonal sums are divided by ``stride`` (the mean product) before the
``1/sqrt(D)`` scaled softmax; a key cell is visible when its first key is at or before the
query cell's last query; tails are zero-padded to whole cells. The per-head threshold
prediction of the paper (a dynamic-programming search, offline) is not included: one
threshold serves every head. Block sizes must be multiples of ``stride``.

``score_precision="fp8"`` (not in the paper, whose kernel scores in 16 bits; off by default):
the antidiagonal products are taken from float8 e4m3 codes of the queries (one scale per head
over the rows being scored) and of the keys minus their per-head sequence mean (one scale per
KV head; subtracting a key mean shifts all scores of a query cell equally, which its softmax
ignores), at twice the tensor-core rate of bf16 on Hopper. The codes keep 3 mantissa bits, so
scores move by a few percent and a block near the threshold can flip; its recall and density
beside the 16-bit scoring are measured in ``benchmarks/estimators.py``
(``--methods xattention:score_precision=fp8``).

Operators: :mod:`sparse_attn.ops.antidiagonal` (the scoring; a Triton kernel on CUDA, the
PyTorch reference elsewhere), :mod:`sparse_attn.ops.selection`, :mod:`sparse_attn.ops.static_masks`
(sink and diagonal), streamed by :func:`sparse_attn.ops.to_pattern.stream_pattern`: each
chunk of query blocks is scored, selected and written into the pattern before the next, so
the ``(n_q, n_kv)`` block probabilities of a head never exist whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_bool, check_fraction, check_int
from ..geometry import num_blocks
from ..ops._shared_scores import memoized, tensor_key
from ..ops.antidiagonal import SCORE_PRECISIONS, antidiagonal_block_probs, fp8_keys
from ..ops.selection import cumulative_mass_mask
from ..ops.static_masks import sink_local_block_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class XAttentionConfig:
    stride: int = 8
    threshold: float = 0.9
    keep_sink: bool = True  # always keep the first KV block
    score_precision: str = "input"  # "fp8": antidiagonal products from e4m3 codes (not in the paper)

    def __post_init__(self) -> None:
        check_int("stride", self.stride, minimum=1)
        check_fraction("threshold", self.threshold)
        check_bool("keep_sink", self.keep_sink)
        if self.score_precision not in SCORE_PRECISIONS:
            raise ValueError(f"score_precision must be one of {SCORE_PRECISIONS}, got {self.score_precision!r}")


@register_method(
    "xattention",
    config=XAttentionConfig,
    paper="Xu et al. 2025, XAttention: Block Sparse Attention with Antidiagonal Scoring (arXiv:2503.16428)",
    summary="strided antidiagonal block scores; per query block the fewest blocks reaching threshold",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: XAttentionConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    seq_q, seq_k = q.shape[2], k.shape[2]
    blocks = dict(block_q=block_q, block_k=block_k)
    precision = dict(score_precision=config.score_precision)
    inputs = (
        "xattention",
        tensor_key(q),
        tensor_key(k),
        config.stride,
        config.score_precision,
        causal,
        block_q,
        block_k,
    )
    if config.score_precision == "fp8":  # the keys' codes once per estimate, not per chunk of query blocks
        precision["keys_fp8"] = memoized((*inputs, "keys"), lambda: fp8_keys(k), (k,))

    def mask_rows(q_blocks: range) -> torch.Tensor:
        # Settings that differ only in threshold share these scores inside a shared_scores() scope (auto).
        probs = memoized(
            (*inputs, q_blocks.start, q_blocks.stop),
            lambda: antidiagonal_block_probs(
                q, k, stride=config.stride, scale=q.shape[-1] ** -0.5, causal=causal, q_blocks=q_blocks, **blocks,
                **precision,
            ),
            (q, k),
        )  # fmt: skip
        mask = cumulative_mass_mask(probs, config.threshold)
        del probs
        if config.keep_sink:
            mask |= sink_local_block_mask(
                seq_q, seq_k, **blocks, sink_blocks=1, local_blocks=1, device=q.device, causal=causal, q_blocks=q_blocks
            )
        return mask

    return stream_pattern(
        mask_rows,
        batch=q.shape[0],
        heads=q.shape[1],
        seq_q=seq_q,
        seq_k=seq_k,
        causal=causal,
        device=q.device,
        row_elements=q.shape[0] * q.shape[1] * num_blocks(seq_k, block_k),
        **blocks,
    )
