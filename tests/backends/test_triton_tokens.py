"""The token-granular Triton kernels (``block_q < 16`` on the ``triton`` backend) against float64 oracles.

Forward (output and log-sum-exp) and gradients against ``helpers.naive_attention`` (dense masked
softmax in float64), on CPU under the interpreter at small shapes: block_q 1, 2, 8; block_k 16,
32, 64 and a non-power of two; GQA 1-8 with 12/4 and 6/3 heads; lists per query head, per KV
head and shared; odd lengths, Sq < Sk, batch > 1 and a pattern broadcast over the batch;
causal and not; fp32 and bf16. Outputs and gradients come from a NaN-poisoned allocator.
GPU tests (``-m gpu``) at real sizes compare with the reference backend.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, expected_nonfinite, naive_attention, random_qkv, relative_error, shape_pattern

import sparse_attn as sa
from sparse_attn.backends import _backend_module, triton_tokens

# (batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block_q, block_k)
SHAPES = [
    (1, 4, 2, 21, 21, 16, 1, 16),
    (2, 6, 3, 23, 37, 32, 2, 16),
    (1, 8, 1, 13, 29, 16, 1, 32),
    (2, 12, 4, 9, 33, 16, 1, 7),
    (1, 3, 3, 27, 40, 64, 8, 16),
    (2, 8, 8, 10, 70, 16, 1, 64),
]
HEAD_KINDS = ("query", "kv", "shared")


def _oracle(q, k, v, pattern, causal, dout, dlse):
    """Float64 output, LSE and gradients of ``sum(out * dout) + sum(lse * dlse)``."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = naive_attention(*leaves, pattern, causal)
    ((out * dout.double()).sum() + (lse * dlse.double()).sum()).backward()
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def _triton(q, k, v, pattern, causal, dout, dlse):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the triton backend runs it: no fallback warning
        out, lse = sa.block_sparse_attention(*leaves, pattern, causal=causal, backend="triton", return_lse=True)
    torch.autograd.backward((out, lse), (dout, dlse))
    return out.detach(), lse.detach(), [x.grad for x in leaves]


def _check(shape, causal, heads_kind, seed, dtype=torch.float32, pattern_batch=None, density=0.4):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, *_ = shape
    heads = {"query": q_heads, "kv": kv_heads, "shared": 1}[heads_kind]
    pattern_shape = (pattern_batch or batch, *shape[1:])
    pattern = shape_pattern(pattern_shape, heads=heads, density=density, causal=causal, seed=seed)
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, dtype=dtype, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    dout = torch.randn(q.shape, generator=generator).to(dtype)
    dlse = torch.randn(q.shape[:3], generator=generator)
    want_out, want_lse, want_grads = _oracle(q, k, v, pattern, causal, dout, dlse)
    out, lse, grads = _triton(q, k, v, pattern, causal, dout, dlse)
    tolerance = TOLERANCE[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert relative_error(out, want_out) <= tolerance, "out"
    assert relative_error(lse, want_lse) <= tolerance, "lse"
    for name, got, want in zip("qkv", grads, want_grads, strict=True):
        assert got.dtype == dtype and torch.isfinite(got).all(), f"d{name} not finite"
        assert relative_error(got, want) <= tolerance, f"d{name}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_forward_and_gradients_match_float64_oracle(shape, causal, poison_outputs):
    # One head kind per case (rotating with the shape) keeps the interpreter time down while
    # every kind meets causal and non-causal cases and several block sizes.
    heads_kind = HEAD_KINDS[(SHAPES.index(shape) + causal) % 3]
    _check(shape, causal, heads_kind, seed=SHAPES.index(shape))


# Blocks of >= 256 keys take the gathered (key-centric) path: per block, the rows that list it.
GATHERED_SHAPES = [
    ((1, 4, 2, 90, 300, 16, 1, 256), True, "kv"),
    ((2, 6, 3, 30, 280, 16, 2, 260), False, "query"),
    ((1, 8, 2, 64, 300, 32, 1, 256), True, "shared"),
]


@pytest.mark.parametrize("shape, causal, heads_kind", GATHERED_SHAPES, ids=str)
def test_gathered_path_matches_float64_oracle(shape, causal, heads_kind, poison_outputs):
    _check(shape, causal, heads_kind, seed=20 + GATHERED_SHAPES.index((shape, causal, heads_kind)))


@pytest.mark.parametrize(
    "shape, heads_kind", [((2, 8, 2, 40, 40, 16, 1, 16), "kv"), ((1, 4, 2, 60, 300, 16, 1, 256), "query")], ids=str
)
def test_dkdv_split_over_long_lists(shape, heads_kind, monkeypatch, poison_outputs):
    """Long transposed lists cut into several dK/dV work items, summed afterwards (tile and
    gathered paths): segments of 4 entries make every list long."""
    from sparse_attn.backends import triton_tokens_backward

    monkeypatch.setattr(triton_tokens_backward, "MIN_SEGMENT", 4)
    monkeypatch.setattr(triton_tokens_backward, "SEGMENT_FACTOR", 0)
    built = []
    original = triton_tokens_backward.dkdv_work
    monkeypatch.setattr(
        triton_tokens_backward, "dkdv_work", lambda *a, **kw: built.append(original(*a, **kw)) or built[-1]
    )
    _check(shape, True, heads_kind, seed=30, density=0.8)
    assert built and built[0].partials > 0 and built[0].sum_combos.numel() > 0


def test_pattern_broadcast_over_the_batch(poison_outputs):
    _check((3, 4, 2, 17, 25, 16, 1, 16), True, "kv", seed=11, pattern_batch=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_k", [16, 256])
def test_half_precision(dtype, block_k, poison_outputs):
    _check((1, 8, 2, 19, 2 * block_k + 44, 32, 1, block_k), True, "kv", seed=12, dtype=dtype)


def test_token_lists_are_tile_unions_with_row_bits():
    """Against a brute-force union per tile and a brute-force transpose."""
    pattern = sa.random_pattern(batch=2, heads=3, seq_q=23, seq_k=50, density=0.5, block_q=2, block_k=8, seed=3)
    tile_blocks = 3
    lists = triton_tokens.token_lists(pattern, tile_blocks)
    mask = pattern.to_mask()  # (B, H, n_q, n_kv)
    n_q, n_kv = pattern.num_q_blocks, pattern.num_kv_blocks
    n_tiles = -(-n_q // tile_blocks)
    transposed = {}
    for b in range(2):
        for h in range(3):
            for tile in range(n_tiles):
                row = (b * 3 + h) * n_tiles + tile
                start, end = lists.offsets[row].item(), lists.offsets[row + 1].item()
                blocks = mask[b, h, tile * tile_blocks : (tile + 1) * tile_blocks]  # (<= tile_blocks, n_kv)
                expected = [j for j in range(n_kv) if blocks[:, j].any()]
                assert lists.blocks[start:end].tolist() == expected
                for j, bits in zip(expected, lists.bits[start:end].tolist(), strict=True):
                    assert bits == sum(1 << i for i in range(blocks.shape[0]) if blocks[i, j])
                    transposed.setdefault((b, h, j), []).append((tile, bits))
            for j in range(n_kv):
                row = (b * 3 + h) * n_kv + j
                start, end = lists.t_offsets[row].item(), lists.t_offsets[row + 1].item()
                entries = list(zip(lists.t_tiles[start:end].tolist(), lists.t_bits[start:end].tolist(), strict=True))
                assert entries == transposed.get((b, h, j), [])
    assert triton_tokens.token_lists(pattern, tile_blocks) is lists  # built once per pattern


@pytest.mark.parametrize(
    "heads, block_q, expected",
    [
        ((64, 4, 4), 1, (16, 1, 1, 16)),  # NSA: the group's 16 heads of one token
        ((64, 4, 64), 1, (1, 16, 16, 16)),  # lists per query head (moba): 16 tokens of one head
        ((12, 4, 4), 1, (3, 5, 5, 16)),  # 3 heads x 5 tokens, padded to 16 rows
        ((12, 4, 1), 2, (3, 2, 4, 16)),  # shared lists: the group packs as for per-KV-head lists
        ((48, 1, 1), 8, (8, 1, 8, 64)),  # a group of 48 with 8-token blocks: 8 heads (<= 64 rows)
        ((4, 4, 4), 8, (1, 2, 16, 16)),  # no GQA
    ],
)
def test_token_tiling(heads, block_q, expected):
    tiling = triton_tokens.token_tiling(*heads, block_q)
    assert (tiling.heads, tiling.tile_blocks, tiling.tile_tokens, tiling.block_m) == expected


def test_triton_backend_routes_small_query_blocks_to_the_token_kernel():
    small = sa.random_pattern(seq_q=32, density=0.5, block_q=4, block_k=16)
    large = sa.random_pattern(seq_q=32, density=0.5, block_q=16, block_k=16)
    assert _backend_module("triton", small) is triton_tokens
    assert _backend_module("triton", large).__name__.endswith("backends.triton")
    assert _backend_module("gluon", small).__name__.endswith("backends.gluon")  # gluon falls back to triton


@pytest.mark.parametrize("block_k", [8, 256])
def test_non_finite_v_reaches_only_the_rows_that_list_its_block(block_k, poison_outputs):
    """A tile's union holds blocks some of its rows do not list: their zero weights must not
    carry a NaN of V into them (the documented rule, per query block = per token here). On the
    gathered path, a row's partial over the poisoned block must reach the merge, a causally
    hidden one included."""
    seq_q = seq_k = 5 * block_k
    q, k, v = random_qkv(1, 2, 2, seq_q, seq_k, 16, seed=4)
    v[0, 1, 5, 3] = float("nan")  # seen by later tokens of block 0, causally hidden from the first five
    # Lists per query head: 16-token tiles, where only even tokens list block 0 (besides their own).
    mask = torch.zeros(2, seq_q, 5, dtype=torch.bool)
    mask[:, ::2, 0] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=1, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=True)
    out = sa.block_sparse_attention(q, k, v, pattern, backend="triton")
    assert torch.equal(~torch.isfinite(out), expected_nonfinite(q, k, v, pattern, True))


def test_unlisted_keys_get_zero_gradients(poison_outputs):
    q, k, v = random_qkv(1, 4, 2, 12, 48, 16, seed=5)
    mask = torch.zeros(2, 12, 3, dtype=torch.bool)
    mask[:, :, 0] = True
    pattern = sa.BlockSparsePattern.from_mask(mask, block_q=1, block_k=16, seq_q=12, seq_k=48, causal=False)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    sa.block_sparse_attention(*leaves, pattern, causal=False, backend="triton").sum().backward()
    for grad in (k.grad, v.grad):
        assert torch.isfinite(grad[:, :, :16]).all() and grad[:, :, :16].abs().sum() > 0
        assert torch.equal(grad[:, :, 16:], torch.zeros_like(grad[:, :, 16:]))


def _dense_causal(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    visible = torch.arange(k.shape[2])[None, :] <= torch.arange(q.shape[2])[:, None] + (k.shape[2] - q.shape[2])
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=visible)


@pytest.mark.parametrize("share_in_group", [False, True])
def test_moba_with_every_block_is_dense_causal_attention(share_in_group, poison_outputs):
    q, k, v = random_qkv(2, 6, 3, 19, 30, 16, seed=6)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = sa.sparse_attention(
        *leaves, method="moba", block_size=7, top_k=5, share_in_group=share_in_group, backend="triton"
    )
    dense = [x.clone().double().requires_grad_() for x in (q, k, v)]
    expected = _dense_causal(*dense)
    assert relative_error(out, expected) <= TOLERANCE[torch.float32]
    dout = torch.randn_like(out)
    out.backward(dout)
    expected.backward(dout.double())
    for got, want in zip(leaves, dense, strict=True):
        assert relative_error(got.grad, want.grad) <= TOLERANCE[torch.float32]


def _gpu_compare(q, k, v, pattern):
    """Output and gradients of the triton backend against the reference backend in float32."""
    dout = torch.randn_like(q)
    results = []
    for backend, dtype in (("reference", torch.float32), ("triton", q.dtype)):
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = sa.block_sparse_attention(*leaves, pattern, backend=backend)
        out.backward(dout.to(dtype))
        results.append([out.detach(), *(x.grad for x in leaves)])
    for name, want, got in zip(("out", "dq", "dk", "dv"), *results, strict=True):
        assert torch.isfinite(got).all(), name
        assert relative_error(got, want) <= TOLERANCE[q.dtype], name


@pytest.mark.gpu
@pytest.mark.parametrize("share_in_group", [False, True])
def test_gpu_moba_at_32k(share_in_group, poison_outputs):
    seq = 32768
    q, k, v = random_qkv(1, 32, 8, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=21)
    pattern = sa.estimate(q, k, "moba", block_size=4096, top_k=12, share_in_group=share_in_group)
    assert pattern.block_q == 1
    _gpu_compare(q, k, v, pattern)


@pytest.mark.gpu
@pytest.mark.parametrize("dim, dtype", [(64, torch.float16), (128, torch.float32)])
def test_gpu_moba_512_gathered_path(dim, dtype, poison_outputs):
    """MoBA's 512-token blocks (the gathered path) at 16K, head_dim 64 in fp16 and fp32."""
    seq = 16384
    q, k, v = random_qkv(1, 12, 4, seq, seq, dim, dtype=dtype, device="cuda", seed=24)
    _gpu_compare(q, k, v, sa.estimate(q, k, "moba", block_size=512, top_k=3))


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(64, 4), (48, 4), (32, 8), (28, 4)])
def test_gpu_nsa_like_selection(heads, poison_outputs):
    """NSA's selected branch: blocks of 64 chosen per token and KV group (16 on average), 8K tokens."""
    q_heads, kv_heads = heads
    seq = 8192
    q, k, v = random_qkv(1, q_heads, kv_heads, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=22)
    # 128 blocks of 64: a quarter of each token's earlier blocks, 16 on average, its own always.
    pattern = sa.random_pattern(heads=kv_heads, seq_q=seq, density=0.25, seed=22, block_q=1, block_k=64, device="cuda")
    _gpu_compare(q, k, v, pattern)


@pytest.mark.gpu
def test_gpu_one_token_tiles_at_128k(poison_outputs):
    """128K one-token query tiles (more than a CUDA grid's second axis takes): NSA's shape with
    16 blocks of 64 per token (its own and every fifth before it), against the reference."""
    seq, kv_heads = 131072, 4
    own = torch.arange(seq, device="cuda") // 64
    blocks = own[:, None] - torch.arange(15, -1, -1, device="cuda") * 5  # ascending, the own block last
    counts = (blocks >= 0).sum(-1, dtype=torch.int32)
    # Drop the negative entries: shift each row's kept blocks to its front.
    order = torch.sort((blocks < 0).to(torch.uint8), dim=-1, stable=True).indices
    indices = torch.where(torch.arange(16, device="cuda") < counts[:, None], blocks.gather(-1, order), 0)
    pattern = sa.BlockSparsePattern(
        kv_counts=counts.expand(1, kv_heads, seq).contiguous(),
        kv_indices=indices.to(torch.int32).expand(1, kv_heads, seq, 16).contiguous(),
        block_q=1,
        block_k=64,
        seq_q=seq,
        seq_k=seq,
    )
    q, k, v = random_qkv(1, 64, kv_heads, seq, seq, 128, dtype=torch.bfloat16, device="cuda", seed=23)
    _gpu_compare(q, k, v, pattern)
