"""Shared test utilities: random inputs, a naive dense oracle, and error measures."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import sparse_attn as sa
from sparse_attn.pattern import BlockSparsePattern, random_pattern

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _json_from_child(arguments: list[str]):
    """What ``python *arguments`` prints as JSON, run in a child process without Triton's
    interpreter (kernels made under ``TRITON_INTERPRET=1`` cannot be compiled)."""
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, *arguments], capture_output=True, text=True, env=environment, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def compile_in_child(script: Path, variant: dict) -> dict:
    """Run a kernel-compiling ``script`` (it prints JSON) on ``variant`` in a child process without
    Triton's interpreter (Gluon functions made under ``TRITON_INTERPRET=1`` cannot be compiled)."""
    return _json_from_child([str(script), json.dumps(variant)])


def source_in_child(source: str, *arguments: str):
    """Run Python ``source`` (it prints JSON; ``sys.argv[1:]`` are ``arguments``) in a child
    process without Triton's interpreter; its JSON."""
    return _json_from_child(["-c", source, *arguments])


def load_benchmark(name: str):
    """The script ``benchmarks/<name>.py`` as a module (its ``main`` and helpers, under test)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def assert_same_kernel_values(got: torch.Tensor, want: torch.Tensor) -> None:
    """Two runs of one Triton kernel over the same cells (say a range of query blocks against the
    whole): bit for bit on CUDA; under ``TRITON_INTERPRET=1`` to one or two float32 ulps, because
    numpy's vectorised ``exp`` rounds an element by the SIMD path its position in the array takes
    (measured: 1 ulp apart on an AVX2-only AMD EPYC, equal on earlier machines)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if got.device.type == "cuda":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


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


def text_rows_pattern(
    heads: int, seq: int, block: int, *, band: int = 1, text_keys: bool = False, device="cpu"
) -> BlockSparsePattern:
    """A bidirectional pattern with heavy blocks: a band of ``2 * band + 1`` blocks around the
    diagonal, plus two trailing query blocks that keep every KV block (text tokens attending a
    whole video) and, with ``text_keys``, two trailing KV blocks every query block keeps."""
    n = -(-seq // block)
    rows = torch.arange(n)
    mask = (rows[:, None] - rows[None, :]).abs() <= band
    mask[-2:] = True
    if text_keys:
        mask[:, -2:] = True
    mask = mask.expand(heads, n, n).clone().to(device)
    return BlockSparsePattern.from_mask(mask, block_q=block, block_k=block, seq_q=seq, seq_k=seq, causal=False)


def sample_rows(seq_q: int, count: int, *, boundaries=(16, 64), extra=(), seed: int = 0) -> torch.Tensor:
    """About ``count`` sorted distinct query rows of ``seq_q`` to check a long problem on: the first
    and last two rows, the rows either side of a few multiples of each size in ``boundaries``
    (tile and block edges), the rows in ``extra`` that exist, and uniformly random rows for the rest."""
    generator = torch.Generator().manual_seed(seed)
    rows = [0, 1, seq_q - 2, seq_q - 1, *(r for r in extra if 0 <= r < seq_q)]
    per_size = max(1, count // (4 * max(1, len(boundaries))))
    for size in boundaries:
        multiples = torch.randint(1, max(2, -(-seq_q // size)), (per_size,), generator=generator) * size
        rows += [r for m in multiples.tolist() for r in (m - 1, m) if 0 <= r < seq_q]
    rows += torch.randint(0, seq_q, (max(0, count - len(rows)),), generator=generator).tolist()
    return torch.tensor(sorted(set(rows)), dtype=torch.long)


def _rows_chunk_attention(q, k, v, blocks, mask_pos, key_pos, block_k, scale):
    """Attention of a chunk of rows over all keys, the keys outside the rows' blocks (``blocks``
    bool ``(Bp, h, r, n_kv)``) or after ``mask_pos`` ``(r,)`` masked: ``out``, ``lse``."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, h, r, Sk)
    visible = blocks[..., key_pos // block_k] & (key_pos <= mask_pos[:, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    # As the reference backend: a row with no visible key gets lse -inf and output 0.
    shift = scores.detach().amax(-1, keepdim=True)
    shift = torch.where(torch.isinf(shift), 0.0, shift)
    weights = (scores - shift).exp()
    total = weights.sum(-1, keepdim=True)
    return torch.matmul(weights, v) / torch.where(total == 0, 1.0, total), (torch.log(total) + shift).squeeze(-1)


def row_attention(q, k, v, pattern: BlockSparsePattern, rows, *, causal: bool, scale=None, dtype=torch.float32,
                  budget: int = 1 << 26):  # fmt: skip
    """Exact attention of the query rows ``rows`` only (a long tensor of row indices), each over its
    own pattern keys, computed densely over the keys with the others masked: ``out`` ``(B, Hq, R, D)``
    and ``lse`` ``(B, Hq, R)`` in ``dtype``, differentiable (chunks checkpointed, so the graph keeps
    no scores). Reads each KV head once per chunk of ``budget`` score elements (query heads of one
    KV head x rows), so a few hundred rows of a 128K problem cost a few dense rows' work. Plain
    patterns only (no token rule): it is the oracle of the GPU tests at long context, checked
    against :func:`naive_attention` on CPU."""
    from torch.utils.checkpoint import checkpoint

    if getattr(pattern, "token_rule", None) is not None:
        raise ValueError("row_attention: pattern must be a plain BlockSparsePattern (no token rule)")
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    group, per_pattern_head = q_heads // kv_heads, q_heads // pattern.num_heads
    scale = dim**-0.5 if scale is None else scale
    rows = torch.as_tensor(rows, device=q.device).long()
    n_kv, slots = pattern.num_kv_blocks, torch.arange(pattern.max_kv, device=q.device)
    key_pos = torch.arange(seq_k, device=q.device)
    offset = seq_k - seq_q
    rows_per_chunk = max(1, min(len(rows), budget // (batch * seq_k)))
    heads_per_chunk = max(1, min(group, budget // (batch * seq_k * rows_per_chunk)))
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    outs, lses = [], []
    for kv_head in range(kv_heads):
        keys, values = k[:, kv_head : kv_head + 1].to(dtype), v[:, kv_head : kv_head + 1].to(dtype)
        head_outs, head_lses = [], []
        for first_head in range(kv_head * group, (kv_head + 1) * group, heads_per_chunk):
            heads = torch.arange(first_head, min(first_head + heads_per_chunk, (kv_head + 1) * group), device=q.device)
            row_outs, row_lses = [], []
            for first_row in range(0, len(rows), rows_per_chunk):
                chunk_rows = rows[first_row : first_row + rows_per_chunk]
                query_blocks = chunk_rows // pattern.block_q
                pattern_heads = (heads // per_pattern_head)[:, None]
                counts = pattern.kv_counts[:, pattern_heads, query_blocks]  # (Bp, h, r)
                indices = pattern.kv_indices[:, pattern_heads, query_blocks].long()  # (Bp, h, r, max_kv)
                indices = torch.where(slots < counts[..., None], indices, n_kv)
                blocks = torch.zeros((*counts.shape, n_kv + 1), dtype=torch.bool, device=q.device)
                blocks = blocks.scatter_(-1, indices, True)[..., :n_kv]
                mask_pos = chunk_rows + offset if causal else torch.full_like(chunk_rows, seq_k)
                inputs = (q[:, heads][:, :, chunk_rows].to(dtype), keys, values, blocks, mask_pos, key_pos)
                inputs += (pattern.block_k, scale)
                if grad:
                    out, lse = checkpoint(_rows_chunk_attention, *inputs, use_reentrant=False)
                else:
                    out, lse = _rows_chunk_attention(*inputs)
                row_outs.append(out)
                row_lses.append(lse)
            head_outs.append(torch.cat(row_outs, 2))
            head_lses.append(torch.cat(row_lses, 2))
        outs.append(torch.cat(head_outs, 1))
        lses.append(torch.cat(head_lses, 1))
    return torch.cat(outs, 1), torch.cat(lses, 1)


def assert_backends_match_reference(q, k, v, pattern, backends, dtype, *, causal: bool) -> None:
    """Output, LSE and q/k/v gradients of each of ``backends`` (run in ``dtype``) against the
    reference backend in float32, on one random output gradient."""
    dout = torch.randn_like(q)
    results = []
    for backend, run_dtype in (("reference", torch.float32), *((name, dtype) for name in backends)):
        leaves = [x.detach().to(run_dtype).requires_grad_() for x in (q, k, v)]
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend=backend, return_lse=True)
        out.backward(dout.to(run_dtype))
        results.append((out, lse, [x.grad for x in leaves]))
    (want, want_lse, want_grads), *runs = results
    for out, lse, grads in runs:
        assert relative_error(out, want) <= TOLERANCE[dtype] and relative_error(lse, want_lse) <= 1e-3
        for got, expected in zip(grads, want_grads, strict=True):
            assert torch.isfinite(got).all() and relative_error(got, expected) <= TOLERANCE[dtype]
