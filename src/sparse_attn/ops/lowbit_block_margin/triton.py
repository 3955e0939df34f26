"""Block margins of low-bit logits in Triton: :func:`.naive.lowbit_block_margin` from the codes' own products.

The reference dequantises the rows to float32, forms every row's logits against every key in
float32 and writes each row's maximum per KV block before reducing them: at SALE's scale
(every query row against every key) that table and the float32 products cost several times
dense attention. Here one program takes ``BLOCK_M`` rows of one query head (a query block, or
``BLOCK_M`` rows of one when ``block_q`` is larger) and a range of KV blocks; per KV block it
forms the tile's products on the tensor cores from the codes themselves (int8 codes: integer
products summed in int32, exact; fp8 codes: converted to bfloat16, exactly, and summed in
float32, since the fp8 tensor cores keep their sums at lower precision), applies the two
scales and the key bias in registers (two operations per pair), takes each row's maximum,
subtracts the row's threshold and writes one float: the tile's largest margin. Query blocks larger than ``BLOCK_M`` reduce their sub-blocks' margins after
the launch.

Differences from the reference: the scales multiply the integer sum (``(c_q · c_k) * s_q *
s_k``) where the reference sums the dequantised products (``sum (c_q s_q) c_k`` then ``* s_k``),
so the margins agree to float32 rounding (about ``1e-6`` relative to the logits), not bit for
bit. Under ``TRITON_INTERPRET=1`` the codes are converted to float32 before the launch and
the products are IEEE float32 (integer products of int4 codes are exact there too).

Rows of one program belong to one query head, so the key bias is a vector per KV block, and
the programs of a GQA group's heads over the same rows run side by side (they read the same
keys; the launch order keeps them adjacent). Rows whose keys all lie after their position
(``q_positions``) skip the products as in :mod:`sparse_attn.ops.block_max.triton`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...geometry import num_blocks
from ...utils import interpreting
from .._dispatch import device_unsupported_reason, power_of_two_reason
from .._triton_util import split_key_blocks

__all__ = ["lowbit_block_margin_triton", "unsupported_reason"]

_CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)
# Programs per launch to aim for (about four per SM of an H100/H200): the KV blocks are split
# into ranges until the grid reaches it.
_TARGET_PROGRAMS = 512
_MAX_BLOCK_M = 128
# Launch choice (num_warps, num_stages) per BLOCK_M; measured on an H200 (benchmarks/results/h200/NOTES.md).
_LAUNCH = {128: (4, 2), 64: (4, 3), 32: (4, 2), 16: (4, 2)}
_empty = torch.empty  # the output's allocator: the tests poison it


def unsupported_reason(q_codes: torch.Tensor, *, k_codes: torch.Tensor, block_q: int, block_k: int) -> str | None:
    """Why the kernel cannot take this case, or ``None``."""
    if q_codes.dim() != 4 or k_codes.dim() != 4:
        return "takes q_codes (B, Hq, R, D) and k_codes (B, Hkv, Sk, D)"
    if q_codes.dtype not in _CODE_DTYPES or k_codes.dtype != q_codes.dtype:
        return f"takes int8 or float8_e4m3fn codes of one dtype, got {q_codes.dtype} and {k_codes.dtype}"
    reason = (
        power_of_two_reason("head_dim", q_codes.shape[-1], 32, 256, " (the 8-bit products' K)")
        or power_of_two_reason("block_k", block_k, 16, 128)
        or power_of_two_reason("block_q", block_q, 16, 1024)
    )
    if reason is not None:
        return reason
    if q_codes.shape[2] == 0 or k_codes.shape[2] == 0:
        return "takes at least one row and one key"
    if k_codes.device != q_codes.device:
        return "takes q_codes and k_codes on one device"
    if (k_codes.shape[2] + block_k) * max(k_codes.stride(2), 1) >= 2**31:
        return "takes heads whose keys span fewer than 2^31 elements"
    return device_unsupported_reason(q_codes)


@triton.jit
def _margin_kernel(
    QC, QS, Thr, KC, KS, Bias, Positions, Out,
    rows, seq_k, n_kv, n_tiles, q_heads, group, blocks_per_split,
    stride_qb, stride_qh, stride_qr, stride_sb, stride_sh, stride_tb, stride_th,
    stride_kb, stride_kh, stride_ks, stride_ksb, stride_ksh, stride_bb, stride_bh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
    CODES_FP8: tl.constexpr, HAS_POSITIONS: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    batch_head = tl.program_id(0)
    b = (batch_head // q_heads).to(tl.int64)
    h = (batch_head % q_heads).to(tl.int64)
    kv = h // group
    tile = tl.program_id(1)
    m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    m_valid = m < rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        QC + b * stride_qb + h * stride_qh + m[:, None] * stride_qr + d[None, :], mask=m_valid[:, None], other=0.0
    )
    if CODES_FP8 and not DOT_FP32:
        q = q.to(tl.bfloat16)  # once, not per key block
    q_scale = tl.load(QS + b * stride_sb + h * stride_sh + m, mask=m_valid, other=0.0)
    # Rows past R: threshold +inf, so their margins are -inf.
    threshold = tl.load(Thr + b * stride_tb + h * stride_th + m, mask=m_valid, other=float("inf"))
    # Blocks before full_end are whole and visible to every row of the tile: no mask.
    first, last, visible_end, full_end, position = split_key_blocks(
        Positions, m, m_valid, n_kv, blocks_per_split, seq_k, BLOCK_N, HAS_POSITIONS
    )
    out = Out + (batch_head.to(tl.int64) * n_tiles + tile) * n_kv
    k_base = KC + b * stride_kb + kv * stride_kh
    n_local = tl.arange(0, BLOCK_N)
    for j in range(first, visible_end):
        n = j * BLOCK_N + n_local
        n_valid = n < seq_k
        keys = tl.load(k_base + n[:, None] * stride_ks + d[None, :], mask=n_valid[:, None], other=0.0)
        if DOT_FP32:
            products = tl.dot(q, tl.trans(keys), input_precision="ieee")
        elif CODES_FP8:
            # e4m3 codes are exact in bfloat16; bfloat16 products sum in full float32, where
            # the fp8 tensor cores' sums are kept at lower precision (about 2^-12 relative).
            products = tl.dot(q, tl.trans(keys.to(tl.bfloat16)))
        else:
            products = tl.dot(q, tl.trans(keys)).to(tl.float32)
        k_scale = tl.load(KS + b * stride_ksb + kv * stride_ksh + n, mask=n_valid, other=0.0)
        logits = products * k_scale[None, :]
        if HAS_BIAS:
            bias = tl.load(Bias + b * stride_bb + h * stride_bh + n, mask=n_valid, other=0.0)
            logits = logits * q_scale[:, None] + bias[None, :]
        else:
            logits = logits * q_scale[:, None]
        if j >= full_end:
            keep = n_valid[None, :]
            if HAS_POSITIONS:
                keep = keep & (n[None, :] <= position[:, None])
            logits = tl.where(keep, logits, float("-inf"))
        # The threshold per row after the row's maximum: one subtraction per row, not per pair.
        tl.store(out + j, tl.max(tl.max(logits, axis=1) - threshold, axis=0))
    for j in range(visible_end, last):
        tl.store(out + j, float("-inf"))


def lowbit_block_margin_triton(
    q_codes: torch.Tensor,
    q_scale: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    row_threshold: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    key_bias: torch.Tensor | None = None,
    q_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as :func:`.naive.lowbit_block_margin` (float32 ``(B, Hq, n_blocks, n_kv)``), from one launch."""
    reason = unsupported_reason(q_codes, k_codes=k_codes, block_q=block_q, block_k=block_k)
    if reason is not None:
        raise ValueError(f"lowbit_block_margin_triton: {reason}")
    batch, q_heads, rows, dim = q_codes.shape
    kv_heads, seq_k = k_codes.shape[1], k_codes.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    block_m = min(block_q, _MAX_BLOCK_M)
    n_tiles = triton.cdiv(rows, block_m)
    q_codes = q_codes if q_codes.stride(-1) == 1 else q_codes.contiguous()
    k_codes = k_codes if k_codes.stride(-1) == 1 else k_codes.contiguous()
    codes_fp8 = q_codes.dtype == torch.float8_e4m3fn
    dot_fp32 = interpreting()
    if dot_fp32:  # the interpreter's conversions of integer and fp8 codes inside a kernel are not relied on
        q_codes, k_codes = q_codes.float(), k_codes.float()
    out = _empty((batch, q_heads, n_tiles, n_kv), dtype=torch.float32, device=q_codes.device)
    splits = max(1, min(n_kv, triton.cdiv(_TARGET_PROGRAMS, batch * q_heads * n_tiles)))
    blocks_per_split = triton.cdiv(n_kv, splits)
    splits = triton.cdiv(n_kv, blocks_per_split)
    q_scale, k_scale, row_threshold = (x.float().contiguous() for x in (q_scale, k_scale, row_threshold))
    positions = (
        q_positions.to(device=q_codes.device, dtype=torch.int64).contiguous() if q_positions is not None else out
    )
    bias = key_bias.float().contiguous() if key_bias is not None else out
    _margin_kernel[(batch * q_heads, n_tiles, splits)](
        q_codes, q_scale, row_threshold, k_codes, k_scale, bias, positions, out,
        rows, seq_k, n_kv, n_tiles, q_heads, q_heads // kv_heads, blocks_per_split,
        *q_codes.stride()[:3], *q_scale.stride()[:2], *row_threshold.stride()[:2],
        *k_codes.stride()[:3], *k_scale.stride()[:2],
        bias.stride(0) if key_bias is not None else 0, bias.stride(1) if key_bias is not None else 0,
        HEAD_DIM=dim, BLOCK_M=block_m, BLOCK_N=block_k, DOT_FP32=dot_fp32, CODES_FP8=codes_fp8,
        HAS_POSITIONS=q_positions is not None, HAS_BIAS=key_bias is not None,
        num_warps=_LAUNCH[block_m][0], num_stages=_LAUNCH[block_m][1],
    )  # fmt: skip
    if block_q == block_m:
        return out
    # Query blocks of several tiles: the largest of their tiles' margins.
    per_block = block_q // block_m
    blocks = num_blocks(rows, block_q)
    out = torch.nn.functional.pad(out, (0, 0, 0, blocks * per_block - n_tiles), value=float("-inf"))
    return out.view(batch, q_heads, blocks, per_block, n_kv).amax(dim=3)
