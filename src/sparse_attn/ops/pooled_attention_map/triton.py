"""The block max-pooled attention map in one kernel: two passes over the keys, ``O(n_q * n_kv)`` written.

One program per (query block, batch x query head): the block's ``block_q`` queries stay in
registers (padded to a power of two of features); pass 1 runs over the visible key tiles
(``block_k`` keys each) keeping each row's running maximum and sum of ``exp2`` (its
log-sum-exp), pass 2 recomputes each tile's logits, takes each row's largest logit in the
tile, turns it into a probability with the row's log-sum-exp and writes the largest over the
block's rows. KV blocks past a causal query block are written 0 without reading them. The
rows are normalised afterwards (a small PyTorch division over ``(n_q, n_kv)``). Nothing
``O(S^2)`` exists at any point; the reference (:mod:`.naive`) builds float32 logits of a
chunk of query blocks instead. GQA: query head ``h`` reads KV head ``h // group``.
"""

from __future__ import annotations

import torch

from ...backends import launch
from ...geometry import num_blocks
from ...utils import dot_in_float32
from .._dispatch import device_unsupported_reason
from ..block_rows import query_block_range

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

__all__ = ["pooled_attention_map_triton", "unsupported_reason"]

BLOCKS = (16, 32, 64, 128)
MAX_HEAD_DIM = 256


def unsupported_reason(q: torch.Tensor, *, block_q: int, block_k: int) -> str | None:
    """Why :func:`pooled_attention_map_triton` cannot run this case, or ``None``."""
    if triton is None:
        return "triton is not installed"
    reason = device_unsupported_reason(q)
    if reason is not None:
        return reason
    if block_q not in BLOCKS or block_k not in BLOCKS:
        return f"the pooled-map kernel takes block_q and block_k in {BLOCKS}, got {block_q} and {block_k}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"the pooled-map kernel takes head_dim <= {MAX_HEAD_DIM}, got {q.shape[-1]}"
    return None


if triton is not None:

    @triton.jit
    def _tile_logits(
        q,
        K,
        cols,
        offs_d,
        d_ok,
        stride_kn,
        seq_k,
        positions,
        scale_log2,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Scaled (log2 domain) logits of the block's rows against key tile ``cols``; masked keys -inf."""
        key_ok = cols < seq_k
        keys = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_FP32:
            logits = tl.dot(q.to(tl.float32), keys.to(tl.float32), input_precision=PRECISION)
        else:
            logits = tl.dot(q, keys, input_precision=PRECISION)
        visible = key_ok[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= positions[:, None])
        return tl.where(visible, logits * scale_log2, float("-inf"))

    @triton.jit
    def _pooled_map(
        Q,
        K,
        Out,
        stride_qb,
        stride_qh,
        stride_qm,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_ob,
        stride_oh,
        stride_oq,
        q_heads,
        group,
        seq_q,
        seq_k,
        n_kv,
        first_block,
        scale_log2,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_Q: tl.constexpr,
        BLOCK_K: tl.constexpr,
        CAUSAL: tl.constexpr,
        DOT_FP32: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0) + first_block
        batch = tl.program_id(1) // q_heads
        head = tl.program_id(1) % q_heads
        rows = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_ok = rows < seq_q
        positions = rows + (seq_k - seq_q)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        q = tl.load(
            q_base + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        K = K + batch.to(tl.int64) * stride_kb + (head // group).to(tl.int64) * stride_kh
        if CAUSAL:
            last_position = tl.minimum((block + 1) * BLOCK_Q, seq_q) - 1 + (seq_k - seq_q)
            kv_stop = last_position // BLOCK_K + 1
        else:
            kv_stop = n_kv
        offs_k = tl.arange(0, BLOCK_K)

        running_max = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_Q], tl.float32)
        for tile in range(0, kv_stop):
            logits = _tile_logits(
                q, K, tile * BLOCK_K + offs_k, offs_d, d_ok, stride_kn, seq_k, positions, scale_log2,
                CAUSAL, DOT_FP32, PRECISION,
            )  # fmt: skip
            new_max = tl.maximum(running_max, tl.max(logits, 1))
            # A row with no visible key yet keeps max -inf; shift by 0 there so no inf - inf appears.
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(logits - shift[:, None]), 1)
            running_max = new_max
        row_lse = running_max + tl.log2(running_sum)

        out = Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + (block - first_block) * stride_oq
        for tile in range(0, kv_stop):
            logits = _tile_logits(
                q, K, tile * BLOCK_K + offs_k, offs_d, d_ok, stride_kn, seq_k, positions, scale_log2,
                CAUSAL, DOT_FP32, PRECISION,
            )  # fmt: skip
            tile_max = tl.max(logits, 1)
            probs = tl.where(row_ok & (tile_max > float("-inf")), tl.exp2(tile_max - row_lse), 0.0)
            tl.store(out + tile, tl.max(probs, 0))
        for tile in range(kv_stop, n_kv):
            tl.store(out + tile, 0.0)


def pooled_attention_map_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool = True,
    q_blocks: range | None = None,
) -> torch.Tensor:
    """:func:`.naive.pooled_attention_map` in the kernel; same arguments and result."""
    reason = unsupported_reason(q, block_q=block_q, block_k=block_k)
    if reason is not None:
        raise ValueError(f"the pooled-map kernel cannot run this case: {reason}")
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    blocks = query_block_range(num_blocks(seq_q, block_q), q_blocks)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    out = launch.allocate((batch, q_heads, len(blocks), n_kv), torch.float32, q.device)
    use_float32_dot = dot_in_float32(q.dtype)
    grid = (len(blocks), batch * q_heads)
    _pooled_map[grid](
        q, k, out,
        *q.stride()[:3], *k.stride()[:3], *out.stride()[:3],
        q_heads, q_heads // kv_heads, seq_q, seq_k, n_kv, blocks.start, scale * 1.4426950408889634,
        HEAD_DIM=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_Q=block_q, BLOCK_K=block_k,
        CAUSAL=bool(causal), DOT_FP32=use_float32_dot, PRECISION="ieee" if use_float32_dot else "tf32",
    )  # fmt: skip
    return out / out.sum(-1, keepdim=True)
