"""SALE: block scores from low-bit (4-bit or fp8) query-key products, judged by the Relative Attention Score.

Paper: Xiaodong Ji, Hailin Zhang, Fangcheng Fu, Bin Cui, "SALE: Low-bit Estimation for
Efficient Sparse Attention in Long-context LLM Prefilling", 2025, arXiv:2505.24179.

Rule (per query head):

1. Smooth and quantise: subtract from the queries their mean over the sequence and from the
   keys theirs (per head), then quantise both per token to 4 bits (symmetric codes in
   ``[-7, 7]``, scale ``absmax / 7``). The estimated logit of a pair is the product of the
   dequantised vectors plus ``mean(q) · k_smoothed`` (kept in full precision, as in the
   paper's kernel: smoothing the queries changes each key's logit by that term); the term
   ``q · mean(k)`` is the same for every key of a row and cancels in any softmax over keys.
2. Anchor region: every query row attends exactly to its sink blocks (the first keys) and its
   local window (the blocks up to its own, ``local_tokens`` of them), which are always
   computed; their log-sum-exp ``lse_anchor`` is taken over the exact (smoothed) logits.
3. Relative Attention Score of a pair outside the region: ``exp(scale * estimated logit -
   lse_anchor)``, the pair's estimated weight relative to the region's softmax denominator.
   A KV block is kept for a query block when some row's largest score in it reaches
   ``threshold``.

Defaults: ``threshold=0.004`` (the released code's example value; the paper calibrates one
threshold per head offline, which is not included here: one threshold serves every head),
``fmt="int4"`` (``"fp8"`` emulates ``float8_e4m3fn`` with scale ``absmax / 448``, an option
the paper's title names but its kernel does not implement), ``sink_tokens=32`` and
``local_tokens=128`` (the released kernel: sink = its first 32-key block, local window 128
keys). Choices where the paper leaves room or where this engine differs:

- Granularity: the paper selects blocks of 64 queries x 32 keys; here the blocks are the
  API's ``block_q`` x ``block_k`` (128 by default), so a kept block covers more keys. The
  sink and window sizes in tokens become whole blocks by ceil (the region never shrinks).
- Quantisation scales are per token. The released kernel's default groups a few tokens per
  scale (a per-warp layout of its int4 tensor-core fragments); per-token scales are the finer
  of the two modes it offers, so this estimate is slightly more accurate than the kernel's.
- The codes are stored at low precision (int8 holding int4 values, or fp8). Off CUDA the
  products are float32 matmuls of the dequantised rows against the codes; on CUDA
  (:mod:`sparse_attn.ops.lowbit_block_margin`) they are the codes' own tensor-core products
  (int4 codes: int8 x int8 summed in int32, exact; fp8 codes: converted to bfloat16, exactly,
  and summed in float32, since the fp8 tensor cores keep their sums at lower precision),
  scaled per token afterwards, and only one value per block pair leaves the kernel: the
  largest margin of a pair's estimated logit over its row's threshold. Hopper has no int4
  tensor cores, so the int4 codes go through the int8 ones, at twice the bfloat16 rate: every
  query-key pair is still scored, about a quarter of dense attention's product work, so no
  kernel of this rule reaches a 5 % budget there (the paper's int4 kernel on other GPUs
  reports about 11 % of dense time). Measured on an H200 at 128K (32/8 heads, head_dim 128):
  the estimate takes 234 ms, 0.88 times dense cuDNN attention, of which the margin kernel
  148 ms (seventeenth session, ``benchmarks/results/h200/estimators_sale_s34b_128k.json``);
  before this kernel the block maxima were bfloat16 products of a two-part split of the
  dequantised queries with every row's maximum written out: 1.42 s, 5.4 times dense
  (fourteenth session, ``estimators_s31d_128k.json``).
- With GQA each query head is scored against its KV head (lists per query head); the means
  for smoothing are per query head and per KV head.
- ``causal=False`` (not in the paper): the window is symmetric around the query block.

Operators: :mod:`sparse_attn.ops.lowbit` (smoothing, quantisation), :mod:`sparse_attn.ops.anchor_region`
(the region's log-sum-exp), :mod:`sparse_attn.ops.lowbit_block_margin` (per block pair, the
largest estimated logit minus its row's threshold), :mod:`sparse_attn.ops.static_masks` (the region's blocks),
streamed over chunks of query blocks by :func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..geometry import num_blocks
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops.anchor_region import anchor_region_stats, region_blocks
from ..ops.gqa import grouped_matmul
from ..ops.lowbit import FORMATS, quantize, sequence_mean
from ..ops.lowbit_block_margin import lowbit_block_margin
from ..ops.static_masks import check_token_window, token_window_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class SaleConfig:
    threshold: float = 0.004
    fmt: str = "int4"
    sink_tokens: int = 32
    local_tokens: int = 128

    def __post_init__(self) -> None:
        check_fraction("threshold", self.threshold)
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        check_token_window(self.sink_tokens, self.local_tokens)
        check_int("sink_tokens", self.sink_tokens, minimum=1)


def _row_positions(seq_q: int, seq_k: int, block_q: int, q_blocks: range, device) -> tuple[int, int, torch.Tensor]:
    """First and end query row of ``q_blocks`` and the rows' absolute positions (int64)."""
    first, end = q_blocks.start * block_q, min(q_blocks.stop * block_q, seq_q)
    return first, end, torch.arange(first, end, device=device) + (seq_k - seq_q)


def mean_query_bias(k: torch.Tensor, query_mean: torch.Tensor, key_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * mean(q) · (k - mean(k))`` per query head and key: float32 ``(B, Hq, Sk)``.

    The full-precision part of each estimated logit. Keys are read a chunk at a time, so no
    float32 copy of the whole of k is made.
    """
    batch, kv_heads, seq_k, dim = k.shape
    bias = torch.empty((batch, query_mean.shape[1], seq_k), dtype=torch.float32, device=k.device)
    tokens = max(1, CHUNK_ELEMENTS // max(1, 2 * batch * kv_heads * dim))
    for start in range(0, seq_k, tokens):
        part = k[:, :, start : start + tokens].float() - key_mean
        bias[:, :, start : start + tokens] = grouped_matmul(query_mean, part).squeeze(2) * scale
    return bias


@register_method(
    "sale",
    config=SaleConfig,
    paper="Ji et al. 2025, SALE: Low-bit Estimation for Efficient Sparse Attention in Long-context LLM "
    "Prefilling (arXiv:2505.24179)",
    summary="4-bit (or fp8) q·k estimates; keep blocks whose Relative Attention Score to the sink+local "
    "region reaches threshold",
    head_local=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: SaleConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Lists per query head: ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``."""
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    scale = q.shape[-1] ** -0.5
    query_mean, key_mean = sequence_mean(q), sequence_mean(k)
    key_codes, key_scale = quantize(k, config.fmt, center=key_mean)
    key_bias = mean_query_bias(k, query_mean, key_mean, scale)
    region = region_blocks(config.sink_tokens, config.local_tokens, block_k, seq_k)
    log_threshold = math.log(config.threshold)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        first, end, positions = _row_positions(seq_q, seq_k, block_q, q_blocks, q.device)
        rows = q[:, :, first:end]
        # The region's log-sum-exp of the smoothed logits: exact logits minus each row's q · mean(k).
        stats = anchor_region_stats(
            q, k, block_q=block_q, block_k=block_k, scale=scale, causal=causal, q_blocks=q_blocks, **region
        )
        row_shift = grouped_matmul(rows.float(), key_mean).squeeze(-1) * scale
        thresholds = stats.row_lse - row_shift + log_threshold
        del stats, row_shift
        query_codes, query_scale = quantize(rows, config.fmt, center=query_mean)
        margin = lowbit_block_margin(
            query_codes,
            query_scale * scale,
            key_codes,
            key_scale,
            thresholds,
            block_q=block_q,
            block_k=block_k,
            key_bias=key_bias,
            q_positions=positions if causal else None,
        )
        del query_codes, query_scale
        return (margin >= 0) | token_window_mask(
            q,
            k,
            sink_tokens=config.sink_tokens,
            local_tokens=config.local_tokens,
            block_q=block_q,
            block_k=block_k,
            causal=causal,
            q_blocks=q_blocks,
        )

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
        # Per query block: its margins and mask (n_kv each) and its rows in float32 (the mean
        # shift); the region's logits (anchor_region_stats) and the reference's per-row maxima
        # (lowbit_block_margin) are chunked inside those operators.
        row_elements=batch * q_heads * (2 * num_blocks(seq_k, block_k) + block_q * q.shape[-1]),
    )
