"""Fused NSA decode step: the Triton kernels (interpreter) against the float64 reference, the launch
plan's splits and chunks, the dispatch rule and the input checks."""

from __future__ import annotations

import pytest
import torch

from sparse_attn.ops.compressed_scores.naive import spread_to_blocks, visible_count
from sparse_attn.ops.nsa_decode import nsa_decode_step, nsa_decode_step_reference
from sparse_attn.ops.nsa_decode import triton as kernels

SMALL = dict(compress_block=8, compress_stride=4, select_block=16, top_n=4, window=20)


def _inputs(batch, q_heads, kv_heads, seq_k, dim, dtype, seed, options):
    generator = torch.Generator().manual_seed(seed)
    block, stride = options["compress_block"], options["compress_stride"]
    n_cmp = max(0, (seq_k - block) // stride + 1)

    def draw(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    q = draw(batch, q_heads, 1, dim)
    k, v = draw(batch, kv_heads, seq_k, dim), draw(batch, kv_heads, seq_k, dim)
    # Compressed keys a bit larger than the keys, so the compressed softmax (and the ranking) is peaked.
    k_cmp, v_cmp = draw(batch, kv_heads, n_cmp, dim, std=2.0), draw(batch, kv_heads, n_cmp, dim)
    gate_weight = torch.randn(q_heads, dim, 3, generator=generator) * dim**-0.5
    gate_bias = torch.randn(q_heads, 3, generator=generator)
    return q, k, v, k_cmp, v_cmp, gate_weight, gate_bias


# (batch, q_heads, kv_heads, seq_k, head_dim, options)
CASES = [
    (1, 4, 2, 5, 16, {}),  # no compressed token yet: the forced blocks only
    (1, 4, 2, 8, 16, {}),  # exactly one compressed token
    (2, 12, 4, 63, 32, {}),  # GQA 3, 12 heads
    (1, 3, 1, 64, 16, {}),  # a selection block just completed
    (1, 2, 2, 97, 64, {}),  # group size 1
    (2, 8, 1, 130, 16, dict(window=0)),  # GQA 8, no window branch
    (1, 16, 2, 211, 16, dict(window=300)),  # window longer than the keys; group 8
    (1, 4, 1, 83, 16, dict(compress_block=8, compress_stride=8, select_block=24, top_n=3)),  # l' not a power of 2
    (1, 6, 2, 300, 128, dict(compress_block=32, compress_stride=16, select_block=64, top_n=16, window=64)),
    (1, 2, 1, 77, 256, {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_the_float64_reference(case, dtype, poison_outputs):
    batch, q_heads, kv_heads, seq_k, dim, options = case
    options = {**SMALL, **options}
    tensors = _inputs(batch, q_heads, kv_heads, seq_k, dim, dtype, seed=seq_k, options=options)
    scale = dim**-0.5
    got = kernels.nsa_decode_triton(*tensors, scale=scale, **options)
    want = nsa_decode_step_reference(*(x.double() for x in tensors), scale=scale, **options)
    assert got.dtype == dtype and got.shape == (batch, q_heads, 1, dim)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


def test_many_splits_and_chunks_match_the_reference(poison_outputs):
    """Long enough for several compressed-token splits, several attend splits and several
    candidate chunks (merged by the attend kernel), in float32."""
    options = dict(SMALL, top_n=6)
    batch, q_heads, kv_heads, seq_k, dim = 1, 4, 2, 4421, 16
    plan = kernels.launch_plan(
        batch, kv_heads, seq_k, (seq_k - 8) // 4 + 1, select_block=16, top_n=6, window=20, head_dim=dim,
        multiprocessors=4,
    )  # fmt: skip
    assert plan["splits_c"] > 1 and plan["chunks"] > 1 and plan["splits_a"] > 1
    tensors = _inputs(batch, q_heads, kv_heads, seq_k, dim, torch.float32, seed=3, options=options)
    got = kernels.nsa_decode_triton(*tensors, scale=0.25, **options)
    want = nsa_decode_step_reference(*(x.double() for x in tensors), scale=0.25, **options)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def _reference_ranking(q, k_cmp, seq_k, scale, compress_block, compress_stride, select_block):
    """Float64 ``(B, Hkv, own + 1)`` selection scores of the query at ``seq_k - 1``, forced blocks at inf."""
    batch, q_heads, _, dim = q.shape
    kv_heads = k_cmp.shape[1]
    own = (seq_k - 1) // select_block
    visible = visible_count(seq_k - 1, compress_block, compress_stride, k_cmp.shape[2])
    rows = q.double().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    logits = rows @ k_cmp[:, :, :visible].double().transpose(-1, -2) * scale
    probabilities = torch.softmax(logits, -1).sum(2)
    ranking = spread_to_blocks(
        probabilities, compress_block // compress_stride, select_block // compress_stride, own + 1
    )
    ranking[..., 0] = float("inf")
    ranking[..., max(own - 1, 0) :] = float("inf")
    return ranking


@pytest.mark.parametrize(
    "case", [(2, 8, 2, 700, 16, 6), (1, 4, 2, 4421, 16, 6), (1, 3, 3, 900, 32, 9), (1, 16, 1, 1000, 16, 12)], ids=str
)
def test_selection_scores_and_blocks_match_the_reference(case):
    """Kernels 1-2: each kept block's score equals the float64 rule's and no dropped block beats it."""
    batch, q_heads, kv_heads, seq_k, dim, top_n = case
    options = dict(compress_block=8, compress_stride=4, select_block=16, top_n=top_n)
    q, _, _, k_cmp, v_cmp, _, _ = _inputs(
        batch, q_heads, kv_heads, seq_k, dim, torch.float32, seq_k, {**SMALL, **options}
    )
    blocks, scores = kernels.selection_triton(q, k_cmp, v_cmp, seq_k=seq_k, scale=0.3, **options)
    ranking = _reference_ranking(q, k_cmp, seq_k, 0.3, 8, 4, 16)
    assert blocks.shape == (batch, kv_heads, top_n)
    kept = ranking.gather(-1, blocks)
    torch.testing.assert_close(scores.double(), kept, rtol=1e-4, atol=1e-6)
    assert (kept[..., :3] == float("inf")).all()  # the forced blocks first
    dropped = ranking.scatter(-1, blocks, float("-inf")).amax(-1)
    assert (kept.amin(-1) >= dropped - 1e-5).all()


def test_extra_compressed_tokens_past_the_keys_are_ignored(poison_outputs):
    """A cache may hold more compressed tokens than the keys' whole blocks: only visible ones count."""
    tensors = list(_inputs(1, 4, 2, 50, 16, torch.float32, seed=1, options=SMALL))
    want = kernels.nsa_decode_triton(*tensors, scale=0.25, **SMALL)
    tensors[3] = torch.cat([tensors[3], torch.full_like(tensors[3][:, :, :3], 1e4)], dim=2)
    tensors[4] = torch.cat([tensors[4], torch.full_like(tensors[4][:, :, :3], float("nan"))], dim=2)
    got = kernels.nsa_decode_triton(*tensors, scale=0.25, **SMALL)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_cpu_dispatch_runs_the_differentiable_reference():
    tensors = [x.double() for x in _inputs(2, 4, 2, 40, 8, torch.float32, seed=2, options=SMALL)]
    q = tensors[0].requires_grad_()
    out = nsa_decode_step(*tensors, scale=0.3, **SMALL)
    assert out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(q=torch.zeros(1, 4, 2, 8)), ValueError, "one query per sequence"),
        (dict(v=torch.zeros(1, 2, 39, 8)), ValueError, "v must have k's shape"),
        (dict(k_cmp=torch.zeros(1, 2, 3, 8), v_cmp=torch.zeros(1, 2, 3, 8)), ValueError, "k_cmp must hold the 9"),
        (dict(gate_weight=torch.zeros(4, 8, 2)), ValueError, "gate_weight must have shape"),
        (dict(gate_bias=[0.0]), TypeError, "gate_bias must be a torch.Tensor"),
        (dict(top_n=0), ValueError, "top_n"),
        (dict(window=-1), ValueError, "window"),
        (dict(select_block=10), ValueError, "select_block .10. must be a multiple of compress_stride"),
        (dict(scale=float("nan")), TypeError, "scale"),
        (dict(k=torch.zeros(1, 2, 40, 8, dtype=torch.float64)), TypeError, "k must have q's dtype"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_inputs_are_named(change, error, match):
    q, k, v, k_cmp, v_cmp, gate_weight, gate_bias = _inputs(1, 4, 2, 40, 8, torch.float32, seed=0, options=SMALL)
    arguments = dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, gate_weight=gate_weight, gate_bias=gate_bias)
    options = dict(SMALL, scale=0.3)
    for name, value in change.items():
        (arguments if name in arguments else options)[name] = value
    with pytest.raises(error, match=match):
        nsa_decode_step(**arguments, **options)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "shape",
    [(1, 64, 4, 131071, 128), (8, 64, 4, 8192, 128), (3, 9, 3, 5000, 64), (2, 12, 4, 33000, 256)],
    ids=str,
)
def test_gpu_kernels_match_the_reference_at_real_sizes(shape, dtype):
    """The paper's defaults on the H200: the kernels against the float64 reference (CPU)."""
    batch, q_heads, kv_heads, seq_k, dim = shape
    options = dict(compress_block=32, compress_stride=16, select_block=64, top_n=16, window=512)
    tensors = _inputs(batch, q_heads, kv_heads, seq_k, dim, dtype, seed=seq_k, options=options)
    got = nsa_decode_step(*(x.cuda() for x in tensors), scale=dim**-0.5, **options)
    want = nsa_decode_step_reference(*(x.double() for x in tensors), scale=dim**-0.5, **options)
    torch.testing.assert_close(got.double().cpu(), want, rtol=2e-2, atol=2e-2)
