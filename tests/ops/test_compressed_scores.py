"""NSA's selection-block scores from the compressed branch's LSE: reference, kernel and NSA's own scores."""

from __future__ import annotations

import functools

import pytest
import torch

from sparse_attn.nn.nsa import NativeSparseAttention
from sparse_attn.ops.compressed_scores import compressed_block_scores, naive

# (compress_block l, compress_stride d, select_block l', group G, batch, kv_heads, chunk c, first_pos, Sk, head_dim):
# the brief's (l, d, l') triples plus the paper's (32, 16, 64); G 1-5; odd chunk lengths; chunks at the
# start (rows that see no compressed key), in the middle (first_pos > 0, first_pos + c < Sk) and at the
# end; under the interpreter (16-key sub-tiles) programs own 1 to 16 blocks, a selection block's keys
# need several sub-tiles (d = 1, l' = 32), and chunks exceed the 16-token tile.
CASES = [
    (8, 4, 16, 1, 2, 2, 13, 0, 40, 16),
    (4, 4, 8, 3, 2, 1, 37, 90, 200, 16),
    (16, 4, 16, 4, 2, 2, 19, 250, 300, 32),
    (8, 8, 8, 3, 2, 2, 17, 30, 47, 16),
    (32, 16, 64, 5, 1, 1, 21, 1040, 1100, 64),
    (8, 1, 32, 2, 1, 2, 11, 60, 100, 16),
]


def _inputs(case, dtype=torch.float32, seed=0, transposed=False):
    """q, k_cmp, lse (from a float64 softmax over the visible compressed keys) and the options."""
    length, stride, block, group, batch, kv_heads, chunk, first_pos, seq_k, dim = case
    generator = torch.Generator().manual_seed(seed)
    n_cmp = max(0, (seq_k - length) // stride + 1)
    if transposed:  # (B, c, H, D) storage seen as (B, H, c, D), as transformers passes q
        q = torch.randn(batch, chunk, kv_heads * group, dim, generator=generator).transpose(1, 2)
    else:
        q = torch.randn(batch, kv_heads * group, chunk, dim, generator=generator)
    q, k_cmp = q.to(dtype), torch.randn(batch, kv_heads, n_cmp, dim, generator=generator).to(dtype)
    scale = dim**-0.5
    logits = q.double() @ k_cmp.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    ends = torch.arange(n_cmp) * stride + length - 1
    logits = logits.masked_fill(ends > (torch.arange(chunk) + first_pos)[:, None], float("-inf"))
    options = dict(
        first_pos=first_pos,
        compress_block=length,
        compress_stride=stride,
        select_block=block,
        n_select=-(-seq_k // block),
        scale=scale,
    )
    return q, k_cmp, torch.logsumexp(logits, -1).float(), options


def brute_force(q, k_cmp, lse, *, first_pos, compress_block, compress_stride, select_block, n_select, scale):
    """The formula in float64: probabilities from ``lse``, times a dense overlap matrix of interval intersections."""
    group = q.shape[1] // k_cmp.shape[1]
    n_cmp = k_cmp.shape[2]
    logits = q.double() @ k_cmp.double().repeat_interleave(group, 1).transpose(-1, -2) * scale
    probabilities = torch.exp(logits - lse.double()[..., None])
    positions = torch.arange(q.shape[2]) + first_pos
    for i in range(n_cmp):
        unseen = (i * compress_stride + compress_block - 1 > positions)[None, None, :] | (lse == float("-inf"))
        probabilities[..., i] = probabilities[..., i].masked_fill(unseen, 0.0)
    overlap = torch.zeros(n_cmp, n_select, dtype=torch.float64)
    for i in range(n_cmp):
        for j in range(n_select):
            start, stop = i * compress_stride, i * compress_stride + compress_block
            overlap[i, j] = max(0, min(stop, (j + 1) * select_block) - max(start, j * select_block)) / compress_stride
    per_head = probabilities @ overlap
    return per_head.view(q.shape[0], k_cmp.shape[1], group, q.shape[2], n_select).sum(2)


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_the_formula(case):
    q, k_cmp, lse, options = _inputs(case, seed=sum(case))
    if case[6] > 5:
        lse[:, -1, 3] = float("-inf")  # a row told it sees nothing contributes nothing
    out = compressed_block_scores(q, k_cmp, lse, **options)
    expected = brute_force(q, k_cmp, lse, **options)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-6)
    # Every query head's probabilities sum to 1 over its visible keys, and each key's weights to l / d.
    seen = lse.view(*out.shape[:2], -1, out.shape[2]) > float("-inf")
    total = seen.sum(2) * (options["compress_block"] / options["compress_stride"])
    torch.testing.assert_close(out.sum(-1).double(), total.double(), rtol=1e-4, atol=1e-5)


def test_chunked_reference_equals_the_whole(monkeypatch):
    q, k_cmp, lse, options = _inputs(CASES[2], seed=1)
    whole = compressed_block_scores(q, k_cmp, lse, **options)
    monkeypatch.setattr(naive, "CHUNK_ELEMENTS", 1)  # one row per step
    torch.testing.assert_close(compressed_block_scores(q, k_cmp, lse, **options), whole)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_the_reference(case, dtype, poison_outputs):
    from sparse_attn.ops.compressed_scores.triton import compressed_block_scores_triton

    transposed = case[3] == 3
    q, k_cmp, lse, options = _inputs(case, dtype=dtype, seed=sum(case) + 1, transposed=transposed)
    if transposed:  # lse as a (B, c, Hq) buffer seen as (B, Hq, c)
        lse = lse.transpose(1, 2).contiguous().transpose(1, 2)
    lse[:, -1, 2] = float("-inf")  # a row told it sees nothing contributes nothing
    out = compressed_block_scores_triton(q, k_cmp, lse, **options)
    expected = naive.compressed_block_scores(q, k_cmp, lse, **options)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, rtol=tolerance, atol=1e-6)


@pytest.mark.parametrize("block_n", [64, 128])
def test_kernel_with_the_gpu_sub_tile_widths(block_n, monkeypatch, poison_outputs):
    """The interpreter at a GPU candidate's key sub-tile (one program owning 15 or 31 blocks)."""
    from sparse_attn.ops.compressed_scores import triton as kernel

    assert any(config[1] == block_n for config in kernel.CONFIGS + kernel.TMA_CONFIGS)
    monkeypatch.setattr(kernel, "_INTERPRETER_CONFIG", (16, block_n, 4))
    q, k_cmp, lse, options = _inputs(CASES[4], dtype=torch.float32, seed=7)  # NSA's l = 32, d = 16, l' = 64
    out = kernel.compressed_block_scores_triton(q, k_cmp, lse, **options)
    torch.testing.assert_close(out, naive.compressed_block_scores(q, k_cmp, lse, **options), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], CASES[4]])
def test_descriptor_loads_equal_pointer_loads(case, poison_outputs):
    """``loads="tma"`` (the query tiles through a descriptor over the group's heads) against pointer
    loads under the interpreter: bit for bit (the same products in the same order), in the (B, H, c, D)
    and the transposed (B, c, H, D) layouts, chunks that end inside a tile included."""
    from sparse_attn.ops.compressed_scores.triton import compressed_block_scores_triton

    for transposed in (False, True):
        q, k_cmp, lse, options = _inputs(case, dtype=torch.bfloat16, seed=sum(case) + 5, transposed=transposed)
        lse[:, -1, 1] = float("-inf")
        tma = compressed_block_scores_triton(q, k_cmp, lse, **options, loads="tma")
        assert torch.equal(tma, compressed_block_scores_triton(q, k_cmp, lse, **options, loads="pointers"))
        torch.testing.assert_close(tma, naive.compressed_block_scores(q, k_cmp, lse, **options), rtol=1e-2, atol=1e-6)


def test_descriptor_loads_are_checked():
    from sparse_attn.ops.compressed_scores.triton import compressed_block_scores_triton

    q, k_cmp, lse, options = _inputs(CASES[1])
    with pytest.raises(ValueError, match="loads='tma' cannot run this case: descriptor loads take float16/bfloat16"):
        compressed_block_scores_triton(q, k_cmp, lse, **options, loads="tma")
    with pytest.raises(ValueError, match="loads must be None or one of"):
        compressed_block_scores_triton(q, k_cmp, lse, **options, loads="async")


def test_kernel_without_compressed_keys_writes_zeros(poison_outputs):
    from sparse_attn.ops.compressed_scores.triton import compressed_block_scores_triton

    # Sk < l: no compressed key at all; and a chunk whose rows all come before the first whole block.
    for case in ((32, 16, 64, 2, 1, 2, 7, 0, 20, 16), (16, 4, 16, 2, 1, 2, 9, 0, 40, 16)):
        q, k_cmp, lse, options = _inputs(case)
        out = compressed_block_scores_triton(q, k_cmp, lse, **options)
        assert torch.equal(out, torch.zeros(1, 2, case[6], options["n_select"]))


def _probabilities(q, keys, key_pos, query_pos, lowest, scale):
    """Softmax of ``q`` ``(B, Hkv, G, c, D)`` over the keys ``(B, Hkv, n, D)`` with
    ``lowest <= key_pos <= query_pos`` (NSA's selection before the operator; a row with no key is 0)."""
    scores = torch.matmul(q * scale, keys.unsqueeze(2).transpose(-1, -2))
    visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] >= lowest[:, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1)[:, None], 0.0)


def _nsa_block_scores(module, q, k_cmp, end, seq_k, tokens, scale):
    """The ``block_scores`` NativeSparseAttention.selection's ``mask_rows`` builds, before forcing and masking."""
    batch, q_heads, seq_q, dim = q.shape
    n_blocks = -(-seq_k // module.select_block)
    start = end - (module.compress_block - 1)
    first = start // module.select_block
    in_first = (torch.clamp((first + 1) * module.select_block, max=end + 1) - start) // module.compress_stride
    in_second = module.compress_block // module.compress_stride - in_first
    second = torch.clamp(first + 1, max=n_blocks - 1)
    query_pos = torch.arange(tokens.start, tokens.stop) + (seq_k - seq_q)
    block_scores = torch.zeros((batch, module.num_kv_heads, len(tokens), n_blocks))
    grouped = q[:, :, tokens.start : tokens.stop].float().view(batch, module.num_kv_heads, -1, len(tokens), dim)
    probabilities = _probabilities(grouped, k_cmp.float(), end, query_pos, torch.zeros_like(query_pos), scale)
    summed = probabilities.sum(2)
    block_scores.index_add_(-1, first, summed * in_first)
    block_scores.index_add_(-1, second, summed * in_second)
    return block_scores


@pytest.mark.parametrize("options", [dict(), dict(compress_block=16, compress_stride=8, select_block=32)])
def test_equals_the_scores_nsa_selection_ranks(options):
    """NSA's selection scores (softmax recomputed) equal the operator's (softmax normaliser from lse),
    for a chunk of rows in the middle of the queries, Sq < Sk, GQA 3."""
    torch.manual_seed(4)
    options = dict(compress_block=8, compress_stride=4, select_block=16, select_top_n=4, window=20) | options
    module = NativeSparseAttention(16, 6, 2, **options)
    batch, seq_q, seq_k = 2, 45, 77
    q = torch.randn(batch, 6, seq_q, 16)
    k, v = torch.randn(batch, 2, seq_k, 16), torch.randn(batch, 2, seq_k, 16)
    scale = 16**-0.5
    with torch.no_grad():
        k_cmp, v_cmp, end = module.compressed_tokens(k, v)
        _, module_lse = module.compressed_branch(q, k_cmp, v_cmp, seq_k, scale)
    tokens = range(7, 38)
    expected = _nsa_block_scores(module, q, k_cmp, end, seq_k, tokens, scale)
    chunk = q[:, :, tokens.start : tokens.stop]
    first_pos = tokens.start + seq_k - seq_q
    logits = chunk.double() @ k_cmp.double().repeat_interleave(3, 1).transpose(-1, -2) * scale
    logits = logits.masked_fill(end > (torch.arange(len(tokens)) + first_pos)[:, None], float("-inf"))
    # The compressed branch's own log-sum-exp (the module passes it to the operator) is this one.
    torch.testing.assert_close(module_lse[:, :, tokens.start : tokens.stop], torch.logsumexp(logits, -1).float())
    out = compressed_block_scores(
        chunk,
        k_cmp,
        torch.logsumexp(logits, -1).float(),
        first_pos=first_pos,
        compress_block=module.compress_block,
        compress_stride=module.compress_stride,
        select_block=module.select_block,
        n_select=expected.shape[-1],
        scale=scale,
    )
    assert (expected > 0).any() and (expected == 0).any()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-6)


def _valid():
    q, k_cmp, lse, options = _inputs(CASES[0])
    return q, k_cmp, lse, options


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda q, k, lse, o: (q, k, lse[:, :, :-1], o), ValueError, "lse must have shape"),
        (lambda q, k, lse, o: (q, k, lse.double(), o), TypeError, "lse must be float32"),
        (lambda q, k, lse, o: (q, k, lse.to("meta"), o), ValueError, "lse must be on q's device"),
        (lambda q, k, lse, o: (q, k.bfloat16(), lse, o), TypeError, "k_cmp must have q's dtype"),
        (lambda q, k, lse, o: (q, k.to("meta"), lse, o), ValueError, "k_cmp must be on q's device"),
        (lambda q, k, lse, o: (q, k[..., :8], lse, o), ValueError, "k_cmp must have q's head_dim"),
        (lambda q, k, lse, o: (q[:, :1], k, lse[:, :1], o), ValueError, "k_cmp's heads"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(compress_block=10)), ValueError, "compress_block .10. must be a multiple"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(select_block=18)), ValueError, "select_block .18. must be a multiple"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(n_select=2, first_pos=30)), ValueError, "n_select .2. blocks"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(first_pos=-1)), ValueError, "first_pos must be >= 0"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(compress_stride=2.0)), TypeError, "compress_stride must be an int"),
        (lambda q, k, lse, o: (q, k, lse, o | dict(scale=None)), TypeError, "scale must be"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(change, error, message):
    q, k_cmp, lse, options = change(*_valid())
    with pytest.raises(error, match=message):
        compressed_block_scores(q, k_cmp, lse, **options)


def test_kernel_refuses_what_it_cannot_run():
    from sparse_attn.ops.compressed_scores import triton as kernel

    assert "head_dim" in kernel.unsupported_reason(torch.zeros(1, 1, 4, 24))
    assert "float64" in kernel.unsupported_reason(torch.zeros(1, 1, 4, 16, dtype=torch.float64))
    assert kernel.unsupported_reason(torch.zeros(1, 1, 4, 16)) is None  # under the interpreter
    q, k_cmp, lse, options = _inputs((8, 4, 16, 1, 1, 1, 5, 0, 20, 24))
    with pytest.raises(ValueError, match="compressed-scores kernel cannot run"):
        kernel.compressed_block_scores_triton(q, k_cmp, lse, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_on_gpu_matches_the_reference_on_small_cases(dtype, poison_outputs):
    """Every CPU case on the GPU through the dispatcher (autotuned tiles, the split second product)."""
    for case in CASES:
        q, k_cmp, lse, options = _inputs(case, dtype=dtype, seed=sum(case) + 2, transposed=case[3] == 3)
        q, k_cmp, lse = q.cuda(), k_cmp.cuda(), lse.cuda()
        out = compressed_block_scores(q, k_cmp, lse, **options)
        expected = naive.compressed_block_scores(q, k_cmp, lse, **options)
        tolerance = 1e-4 if dtype == torch.float32 else 1e-2
        torch.testing.assert_close(out, expected, rtol=tolerance, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_on_gpu_at_nsa_size(dtype, poison_outputs):
    """NSA's defaults (l = 32, d = 16, l' = 64) on 64 / 4 heads of 128 dims: the last 4096-token
    chunk of 32K but one (first_pos 28672 < Sk - c), the dispatched kernel (outputs poisoned) against
    the reference on the GPU; errors relative to each row's largest score. Estimate: a few seconds
    plus autotuning (the reference's float32 logits are 0.5G elements in 2^24-element steps)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, q_heads, kv_heads, dim, chunk, first_pos, seq_k = 1, 64, 4, 128, 4096, 28672, 32768
    n_cmp = (seq_k - 32) // 16 + 1
    q = torch.randn(batch, q_heads, chunk, dim, device="cuda", generator=generator).to(dtype)
    k_cmp = torch.randn(batch, kv_heads, n_cmp, dim, device="cuda", generator=generator).to(dtype)
    scale = dim**-0.5
    ends = torch.arange(n_cmp, device="cuda") * 16 + 31
    hidden = ends > (torch.arange(chunk, device="cuda") + first_pos)[:, None]
    lse = torch.empty(batch, q_heads, chunk, device="cuda")
    for head in range(q_heads):  # one head's float32 logits at a time
        logits = q[:, head].float() @ k_cmp[:, head // (q_heads // kv_heads)].float().transpose(-1, -2) * scale
        lse[:, head] = torch.logsumexp(logits.masked_fill(hidden, float("-inf")), -1)
    options = dict(
        first_pos=first_pos, compress_block=32, compress_stride=16, select_block=64, n_select=512, scale=scale
    )
    expected = naive.compressed_block_scores(q, k_cmp, lse, **options)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    row_max = expected.amax(-1, keepdim=True)
    assert (row_max > 0).all()
    runs = {"dispatched": lambda: compressed_block_scores(q, k_cmp, lse, **options)}
    if dtype != torch.float32:  # each load mode forced, outputs poisoned each time
        from sparse_attn.ops.compressed_scores.triton import compressed_block_scores_triton

        for loads in ("pointers", "tma"):
            runs[loads] = functools.partial(compressed_block_scores_triton, q, k_cmp, lse, **options, loads=loads)
    for name, run in runs.items():
        out = run()
        assert not out.isnan().any(), name
        assert ((out - expected).abs() <= tolerance * row_max).all(), (
            name,
            float(((out - expected).abs() / row_max).max()),
        )
