"""NaN/Inf inputs: every backend propagates them as documented in ``block_sparse_attention`` (SDPA's rule).

A non-finite q row, or a non-finite k at a key the row attends to (in a kept block and causally
visible), acts through that row's softmax; keys the row does not attend to never reach it. A
non-finite v[j, d] makes column d non-finite in the rows of every query block that keeps j's KV
block. ``helpers.expected_nonfinite`` computes that set; each case checks it element by element.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import expected_nonfinite, token_mask

import sparse_attn as sa

NAN, INF = float("nan"), float("inf")
# (tensor, position, value): a q row; k inside a kept block, seen by some rows and masked
# causally for others; k and v in block 0, which several lists do not keep; v in the last,
# partial block; infinities of both signs.
PLACEMENTS = [
    ("q", 10, NAN),
    ("q", 70, INF),
    ("k", 10, NAN),
    ("k", 45, NAN),
    ("k", 2, NAN),
    ("k", 60, INF),
    ("v", 2, NAN),
    ("v", 45, -INF),
    ("v", 88, NAN),
]


def _case(placement, causal, backend_device="cpu", dtype=torch.float32, dim=32, block=16, seed=0):
    """Batch 2, GQA 4/2, Sq < Sk with odd lengths, a random pattern per KV head (batch 2)."""
    tensor, position, value = placement
    generator = torch.Generator().manual_seed(seed)
    seq_q, seq_k = 77, 93
    q = torch.randn(2, 4, seq_q, dim, generator=generator)
    k = torch.randn(2, 2, seq_k, dim, generator=generator)
    v = torch.randn(2, 2, seq_k, dim, generator=generator)
    target = {"q": q, "k": k, "v": v}[tensor]
    target[1, 1, min(position, target.shape[2] - 1), 3] = value
    pattern = sa.random_pattern(
        batch=2, heads=2, seq_q=seq_q, seq_k=seq_k, density=0.5, seed=seed, block_q=block, block_k=block, causal=causal
    )
    expected = expected_nonfinite(q, k, v, pattern, causal)
    q, k, v = (x.to(device=backend_device, dtype=dtype) for x in (q, k, v))
    return q, k, v, pattern.to(backend_device), expected


def _run(backend, q, k, v, pattern, causal):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU says it hands these inputs to the reference
        return sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend=backend)


@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("backend", ["reference", "flex", "triton"])
def test_nonfinite_inputs_reach_exactly_the_documented_outputs(backend, placement, causal):
    q, k, v, pattern, expected = _case(placement, causal)
    assert expected.any(), "the case must poison something"
    out = _run(backend, q, k, v, pattern, causal)
    assert torch.equal(~torch.isfinite(out), expected)


@pytest.mark.parametrize("tensor, position", [("q", 40), ("k", 40), ("k", 3), ("v", 40)])
def test_dense_pattern_poisons_what_sdpa_poisons(tensor, position):
    # SDPA (is_causal) is the rule's source: q and k act through each row's masked softmax
    # exactly alike; a v value reaches at least every row attending to it in both, and SDPA's
    # kernels, like ours, also reach rows that share a tile with those (tiles of their own size).
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=generator) for _ in range(3))
    {"q": q, "k": k, "v": v}[tensor][0, 1, position, 5] = NAN
    pattern = sa.dense_pattern(seq_q=128, block_q=32, block_k=32)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for backend in ("reference", "flex", "triton"):
        out = _run(backend, q, k, v, pattern, True)
        ours, sdpa = ((~torch.isfinite(x)).any(-1)[0, 1] for x in (out, expected))
        if tensor == "v":
            attending = torch.arange(128) >= position
            assert bool((ours >= attending).all() and (sdpa >= attending).all()), backend
            assert not ours[: position // 32 * 32].any(), backend  # query blocks that do not keep it
        else:
            assert torch.equal(ours, sdpa), backend
        assert torch.isfinite(out[0, 0]).all()  # the other head never reads it


def test_masked_keys_do_not_poison_rows():
    # k NaN at a key inside a kept diagonal block: rows before it in that block stay finite.
    q, k, v = (torch.randn(1, 1, 64, 16) for _ in range(3))
    k[0, 0, 40, 0] = NAN
    pattern = sa.dense_pattern(seq_q=64, block_q=32, block_k=32)
    for backend in ("reference", "flex", "triton"):
        out = _run(backend, q, k, v, pattern, True)
        bad = (~torch.isfinite(out)).any(-1)[0, 0]
        assert bad.tolist() == [False] * 40 + [True] * 24, backend
        visible = token_mask(pattern, 1, 1, causal=True)[0, 0, :, 40]
        assert torch.equal(bad, visible)


def test_flex_on_cpu_hands_nonfinite_inputs_to_the_reference_with_one_warning():
    q, k, v, pattern, expected = _case(("k", 45, NAN), True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sa.block_sparse_attention(q, k, v, pattern, backend="flex")
    ours = [w for w in caught if issubclass(w.category, UserWarning)]
    assert len(ours) == 1 and "NaN or Inf" in str(ours[0].message) and "reference" in str(ours[0].message)
    assert torch.equal(~torch.isfinite(out), expected)


@pytest.mark.gpu
@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "backend, dtype, dim, block",
    [
        ("triton", torch.bfloat16, 64, 16),
        ("triton", torch.float32, 128, 32),
        ("gluon", torch.bfloat16, 128, 128),
        ("gluon", torch.float16, 64, 128),
        ("flex", torch.bfloat16, 64, 16),
        ("reference", torch.bfloat16, 64, 16),
    ],
)
def test_gpu_nonfinite_inputs_reach_exactly_the_documented_outputs(backend, dtype, dim, block, placement, causal):
    if backend == "gluon" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel is for Hopper")
    q, k, v, pattern, expected = _case(placement, causal, "cuda", dtype, dim, block)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*using the .*backend")  # each backend runs it, no fallback
        out = sa.block_sparse_attention(q, k, v, pattern, causal=causal, backend=backend)
    assert torch.equal(~torch.isfinite(out).cpu(), expected)
