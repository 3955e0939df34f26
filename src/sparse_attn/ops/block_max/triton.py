"""Block maxima of logits in Triton: :func:`.naive.block_max_logits` without its float32 key copies.

Reference: :func:`.naive.block_max_logits`, which converts each chunk of keys to float32, forms
every row's logits against it in float32 (a matmul without tensor cores), writes them out, masks
them and reduces them per block: at 1M tokens AnchorAttention's pooled queries spend seconds
there. Here one program takes ``BLOCK_M`` rows of one KV head's query heads (the GQA group's
rows stacked, so each key block is read once per group) and a range of KV blocks; per KV block
it forms the tile's logits in registers and writes only each row's maximum.

Products (``MODE``):

- ``0``: float32 on both sides, IEEE products (float32 keys, and every case under the
  interpreter, whose bfloat16 ``dot`` is wrong).
- ``1``: queries and keys of one 16-bit dtype: the tensor cores' products, float32 sums.
- ``2``: float32 queries (pooled or dequantised queries: the estimators' case) against 16-bit
  keys, or against low-bit codes (int8 holding int4 values, fp8 e4m3), which convert exactly to
  bfloat16: each query is split into a 16-bit high part and the 16-bit rounding of the rest,
  and the two products are summed in float32. The split keeps about 16 significant bits of
  each query element (relative error near ``2^-17`` per term), against the reference's 24:
  well inside the ``1e-4`` relative bound of the float32 tests, at twice the tensor-core work
  of one 16-bit product and a small fraction of a float32 matmul's time.

Rows whose key blocks all lie after their position (``q_positions``) skip the products: the
program computes up to the last block its rows can see and writes ``-inf`` after it; only the
blocks that reach past the keys or past some row's position are masked. Positions are taken
as int32 (fewer than 2^31 keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import interpreting
from .._dispatch import device_unsupported_reason, power_of_two_reason
from .._triton_util import split_key_blocks

__all__ = ["block_max_logits_triton", "unsupported_reason"]

_KEY_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn)
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)
# Programs per launch to aim for (about four per SM of an H100/H200): the KV blocks are split
# into ranges until the grid reaches it.
_TARGET_PROGRAMS = 512
_empty = torch.empty  # the output's allocator: the tests poison it


def unsupported_reason(q: torch.Tensor, *, k: torch.Tensor, block_k: int) -> str | None:
    """Why the kernel cannot take this case, or ``None``."""
    if q.dim() != 4 or k.dim() != 4:
        return "takes q (B, Hq, R, D) and k (B, Hkv, Sk, D)"
    if q.dtype not in (torch.float32, *_SIXTEEN_BIT):
        return f"takes float32 or 16-bit queries, not {q.dtype}"
    if k.dtype not in _KEY_DTYPES:
        return f"takes keys of {[str(d) for d in _KEY_DTYPES]}, not {k.dtype}"
    reason = power_of_two_reason("head_dim", q.shape[-1], 16, 256) or power_of_two_reason("block_k", block_k, 16, 128)
    if reason is not None:
        return reason
    if q.shape[2] == 0 or k.shape[2] == 0:
        return "takes at least one row and one key"
    if k.device != q.device:
        return "takes q and k on one device"
    # Row offsets inside one head are int32 in the kernel (int64 addresses cost registers).
    if (k.shape[2] + block_k) * max(k.stride(2), 1) >= 2**31 or (q.shape[2] + 64) * max(q.stride(2), 1) >= 2**31:
        return "takes heads whose rows span fewer than 2^31 elements"
    return device_unsupported_reason(q)


def _mode(q_dtype: torch.dtype, k_dtype: torch.dtype) -> tuple[int, object]:
    """The product mode (module docstring) and the Triton dtype the products are taken in."""
    if k_dtype == torch.float32 or interpreting() and k_dtype != torch.float16:
        return 0, tl.float32
    compute = tl.float16 if k_dtype == torch.float16 else tl.bfloat16
    return (1 if q_dtype == k_dtype else 2), compute


@triton.jit
def _block_max_kernel(
    Q, K, Out, Positions, KeyScale, KeyBias,
    rows, seq_k, n_kv, kv_heads, group, blocks_per_split,
    stride_qb, stride_qh, stride_qr, stride_kb, stride_kh, stride_ks,
    stride_sb, stride_sh, stride_bb, stride_bh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MODE: tl.constexpr,
    COMPUTE: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    batch_kv = tl.program_id(0)
    b = (batch_kv // kv_heads).to(tl.int64)
    kv = (batch_kv % kv_heads).to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = m < group * rows
    head = kv * group + (m // rows)
    row = m % rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        Q + b * stride_qb + head[:, None] * stride_qh + row[:, None] * stride_qr + d[None, :],
        mask=m_valid[:, None],
        other=0.0,
    ).to(tl.float32)
    if MODE == 1:
        q_hi = q.to(COMPUTE)
    if MODE == 2:
        q_hi = q.to(COMPUTE)
        q_lo = (q - q_hi.to(tl.float32)).to(COMPUTE)
    # Blocks before full_end are whole and visible to every row of the tile: no mask.
    first, last, visible_end, full_end, position = split_key_blocks(
        Positions, row, m_valid, n_kv, blocks_per_split, seq_k, BLOCK_N, HAS_POSITIONS
    )
    out_rows = Out + ((b * kv_heads + kv) * group * rows + m) * n_kv
    k_base = K + b * stride_kb + kv * stride_kh
    n_local = tl.arange(0, BLOCK_N)
    for j in range(first, visible_end):
        n = j * BLOCK_N + n_local
        n_valid = n < seq_k
        keys = tl.trans(tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=n_valid[:, None], other=0.0))
        if MODE == 0:
            logits = tl.dot(q, keys.to(tl.float32), input_precision="ieee")
        elif MODE == 1:
            logits = tl.dot(q_hi, keys.to(COMPUTE))
        else:
            keys = keys.to(COMPUTE)
            logits = tl.dot(q_hi, keys)
            logits = tl.dot(q_lo, keys, logits)
        if HAS_SCALE:
            key_scale = tl.load(KeyScale + b * stride_sb + kv * stride_sh + n, mask=n_valid, other=1.0)
            logits = logits * key_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(
                KeyBias + b * stride_bb + head[:, None] * stride_bh + n[None, :],
                mask=m_valid[:, None] & n_valid[None, :],
                other=0.0,
            )
            logits = logits + bias
        if j >= full_end:
            keep = n_valid[None, :]
            if HAS_POSITIONS:
                keep = keep & (n[None, :] <= position[:, None])
            logits = tl.where(keep, logits, float("-inf"))
        tl.store(out_rows + j, tl.max(logits, axis=1), mask=m_valid)
    for j in range(visible_end, last):
        tl.store(out_rows + j, tl.full((BLOCK_M,), float("-inf"), tl.float32), mask=m_valid)


def block_max_logits_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_k: int,
    q_positions: torch.Tensor | None = None,
    key_scale: torch.Tensor | None = None,
    key_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as :func:`.naive.block_max_logits` (float32 ``(B, Hq, R, n_kv)``), from one launch."""
    reason = unsupported_reason(q, k=k, block_k=block_k)
    if reason is not None:
        raise ValueError(f"block_max_logits_triton: {reason}")
    batch, q_heads, rows, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    n_kv = num_blocks(seq_k, block_k)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    if interpreting() and k.dtype in (torch.int8, torch.float8_e4m3fn):
        k = k.float()  # the interpreter's conversions of integer and fp8 codes inside a kernel are not relied on
    out = _empty((batch, q_heads, rows, n_kv), dtype=torch.float32, device=q.device)
    block_m = 64
    # ptxas on sm_90a (tests/ops/triton_sm90_compile.py): 209 registers at head_dim 128 with 4
    # warps; head_dim 256 or a bias tile need 8 to stay clear of spills.
    warps = 8 if dim > 128 or key_bias is not None else 4
    m_tiles = triton.cdiv(group * rows, block_m)
    splits = max(1, min(n_kv, triton.cdiv(_TARGET_PROGRAMS, batch * kv_heads * m_tiles)))
    blocks_per_split = triton.cdiv(n_kv, splits)
    splits = triton.cdiv(n_kv, blocks_per_split)
    mode, compute = _mode(q.dtype, k.dtype)
    dummy = out
    positions = q_positions.to(device=q.device, dtype=torch.int64).contiguous() if q_positions is not None else dummy
    scale = key_scale.float().contiguous() if key_scale is not None else dummy
    bias = key_bias.float().contiguous() if key_bias is not None else dummy
    _block_max_kernel[(batch * kv_heads, m_tiles, splits)](
        q, k, out, positions, scale, bias,
        rows, seq_k, n_kv, kv_heads, group, blocks_per_split,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        scale.stride(0) if key_scale is not None else 0, scale.stride(1) if key_scale is not None else 0,
        bias.stride(0) if key_bias is not None else 0, bias.stride(1) if key_bias is not None else 0,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_k, MODE=mode, COMPUTE=compute,
        HAS_POSITIONS=q_positions is not None, HAS_SCALE=key_scale is not None, HAS_BIAS=key_bias is not None,
        num_warps=warps, num_stages=2,
    )  # fmt: skip
    return out
