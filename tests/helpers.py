"""Shared test utilities: random inputs, a naive dense oracle, and error measures."""

from __future__ import annotations

import torch

from sparse_attn.pattern import BlockSparsePattern, random_pattern

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def random_qkv(
    batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=torch.float32, device="cpu", seed=None, transposed=False
):
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    def draw(heads, length):
        if transposed:  # (B, S, H, D) storage seen as (B, H, S, D), as transformers passes it
            x = torch.randn(batch, length, heads, dim, generator=generator).transpose(1, 2)
        else:
            x = torch.randn(batch, heads, length, dim, generator=generator)
        return x.to(device=device, dtype=dtype)

    return draw(q_heads, seq_q), draw(kv_heads, seq_k), draw(kv_heads, seq_k)


def token_mask(pattern: BlockSparsePattern, batch: int, q_heads: int, causal: bool) -> torch.Tensor:
    """Dense bool (B, Hq, Sq, Sk) mask of the keys each query may see. Tiny sizes only."""
    blocks = pattern.to_mask()
    if pattern.num_heads != q_heads:
        blocks = blocks.repeat_interleave(q_heads // pattern.num_heads, dim=1)
    blocks = blocks.expand(batch, -1, -1, -1)
    mask = blocks.repeat_interleave(pattern.block_q, 2).repeat_interleave(pattern.block_k, 3)
    mask = mask[:, :, : pattern.seq_q, : pattern.seq_k]
    if causal:
        offset = pattern.seq_k - pattern.seq_q
        rows = torch.arange(pattern.seq_q, device=mask.device)[:, None] + offset
        cols = torch.arange(pattern.seq_k, device=mask.device)[None, :]
        mask = mask & (cols <= rows)
    return mask


def naive_attention(q, k, v, pattern, causal, scale=None):
    """Float64 dense masked softmax attention: the oracle for the reference backend."""
    batch, q_heads, _, dim = q.shape
    group = q_heads // k.shape[1]
    scale = dim**-0.5 if scale is None else scale
    k = k.double().repeat_interleave(group, 1)
    v = v.double().repeat_interleave(group, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~token_mask(pattern, batch, q_heads, causal), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    return torch.softmax(scores, -1) @ v, lse


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def poisoned_view(batch, heads, seq, dim, dtype, generator, transposed, device="cpu"):
    """Random (B, H, S, D) values inside a NaN buffer with 8 spare rows per head.

    A kernel that reads a row past its head's sequence instead of zeros turns its output NaN.
    ``transposed``: (B, S, H, D) storage seen as (B, H, S, D), as transformers passes it.
    """
    if transposed:
        buffer = torch.full((batch, seq + 8, heads, dim), float("nan"), dtype=dtype, device=device)
        view = buffer.transpose(1, 2)[:, :, :seq]
    else:
        buffer = torch.full((batch, heads, seq + 8, dim), float("nan"), dtype=dtype, device=device)
        view = buffer[:, :, :seq]
    view.copy_(torch.randn(batch, heads, seq, dim, generator=generator).to(dtype))
    return view


def poisoned_allocate(shape, dtype, device):
    """A stand-in for ``sparse_attn.backends.launch.allocate`` that fills kernel outputs with NaN."""
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def block_reads(pattern: BlockSparsePattern, batch: int, q_heads: int) -> torch.Tensor:
    """Bool (B, Hq, Sq, Sk): the keys of every KV block each query's block keeps, causal or not. Tiny sizes only."""
    return token_mask(pattern, batch, q_heads, causal=False)


def expected_nonfinite(q, k, v, pattern, causal):
    """Bool (B, Hq, Sq, D): the output elements that must be non-finite, by the documented rule.

    A non-finite q row, or a non-finite k at a key the row attends to (kept block, causally
    visible), acts through the softmax as in SDPA (float64 masked softmax with masked scores
    replaced by -inf, so masked keys do not count). A non-finite v[j, d] makes column d
    non-finite in every row whose query block keeps j's KV block (weights there, zero or not,
    multiply v[j, d]).
    """
    batch, q_heads = q.shape[:2]
    group = q_heads // k.shape[1]
    finite_v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    out, _ = naive_attention(q, k, finite_v, pattern, causal)
    bad_v = (~torch.isfinite(v)).double().repeat_interleave(group, 1)  # (B, Hq, Sk, D)
    reads = block_reads(pattern, batch, q_heads).double()
    return ~torch.isfinite(out) | ((reads @ bad_v) > 0)


def shape_pattern(shape, *, heads: int, density: float, causal: bool, seed: int, device="cpu") -> BlockSparsePattern:
    """A random pattern for a test shape ``(batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k)``
    with ``heads`` pattern heads (the query heads, the KV heads or 1)."""
    batch, _, _, seq_q, seq_k, _, block_q, block_k = shape
    return random_pattern(
        batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, density=density, seed=seed,
        block_q=block_q, block_k=block_k, causal=causal, device=device,
    )  # fmt: skip
