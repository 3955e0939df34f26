"""PBS-Attn: the merged output and gradients against a float64 token-level oracle of the keys each
query attends to, the permutation, dense equality at threshold 1, the Triton backend (poisoned
outputs), fallbacks and errors."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import TOLERANCE, random_qkv, relative_error

import sparse_attn as sa
from sparse_attn.methods.pbs import pbs_attention, segment_permutation

# batch, q_heads, kv_heads, seq_q, seq_k, head_dim, block, segment: GQA 1-4, 12/4 and 6/3
# heads, batch 2, Sq < Sk with a block-aligned offset, a trailing partial segment and block.
SHAPES = [
    (1, 4, 2, 200, 200, 32, 16, 32),
    (2, 6, 3, 96, 160, 64, 16, 48),
    (1, 12, 4, 130, 130, 16, 32, 64),
    (1, 2, 2, 75, 107, 128, 8, 16),
]


def attended_keys(info, batch, q_heads, seq_q, seq_k, block, segment) -> torch.Tensor:
    """Bool ``(B, Hq, Sq, Sk)`` in the original key order: own segment causally, plus the far blocks' keys."""
    group = q_heads // info.permutation.shape[1]
    positions = torch.arange(seq_q) + seq_k - seq_q
    keys = torch.arange(seq_k)
    own = (keys[None, :] <= positions[:, None]) & (keys[None, :] // segment == positions[:, None] // segment)
    mask = own.expand(batch, q_heads, seq_q, seq_k).clone()
    if info.far is not None:
        far = info.far.to_mask()
        rows = far.repeat_interleave(block, 2)[:, :, : seq_q - info.first_far_row]
        permuted = rows.repeat_interleave(block, 3)[..., :seq_k].expand(batch, -1, -1, -1)
        order = info.permutation.repeat_interleave(group, 1)[:, :, None, :].expand_as(permuted)
        original = torch.zeros_like(permuted).scatter_(3, order, permuted)
        mask[:, :, info.first_far_row :] |= original
    return mask


def oracle(q, k, v, mask):
    group = q.shape[1] // k.shape[1]
    logits = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), -1) @ v.double().repeat_interleave(group, 1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_output_equals_attention_over_the_attended_keys(shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block, segment = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q)
    k[:, :, 5] *= 4.0
    out, info = pbs_attention(q, k, v, block_size=block, segment_size=segment, threshold=0.6, return_info=True)
    mask = attended_keys(info, batch, q_heads, seq_q, seq_k, block, segment)
    assert relative_error(out, oracle(q, k, v, mask)) < TOLERANCE[torch.float32]
    # Sparse: some earlier-segment keys were skipped; the first token is always attended.
    assert bool(mask[..., 0].all()) and info.density < 1.0
    assert not bool(mask.all(-1).all())


def test_permutation_sorts_each_whole_segment_by_last_block_attention():
    q, k, _ = random_qkv(2, 4, 2, 70, 70, 16, seed=1)
    permutation = segment_permutation(q, k, block_size=8, segment_size=16, scale=0.25)
    logits = q[:, :, -8:].double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 0.25
    logits = logits.masked_fill(torch.arange(70)[None, :] > torch.arange(62, 70)[:, None], float("-inf"))
    importance = torch.softmax(logits, -1).mean(2).view(2, 2, 2, 70).mean(2)
    for start in range(0, 64, 16):
        part = permutation[..., start : start + 16]
        assert torch.equal(part.sort(-1).values, torch.arange(start, start + 16).expand_as(part))
        scores = torch.gather(importance, 2, part)
        assert bool((scores[..., :-1] >= scores[..., 1:]).all())
    assert torch.equal(permutation[..., 64:], torch.arange(64, 70).expand(2, 2, 6))


def test_threshold_one_is_dense_causal_attention():
    q, k, v = random_qkv(2, 4, 1, 90, 90, 32, seed=2)
    dense = sa.block_sparse_attention(q, k, v, sa.dense_pattern(seq_q=90, seq_k=90, block_q=16, block_k=16))
    out = pbs_attention(q, k, v, block_size=16, segment_size=32, threshold=1.0)
    assert relative_error(out, dense) < TOLERANCE[torch.float32]


def test_gradients_match_the_oracle():
    q, k, v = random_qkv(1, 4, 2, 64, 96, 16, seed=3)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, info = pbs_attention(q, k, v, block_size=8, segment_size=16, threshold=0.5, return_info=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    mask = attended_keys(info, 1, 4, 64, 96, 8, 16)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    oracle(*leaves, mask).backward(grad.double())
    for ours, expected in zip((q, k, v), leaves, strict=True):
        assert relative_error(ours.grad, expected.grad) < TOLERANCE[torch.float32]


def test_triton_backend_matches_the_reference(poison_outputs):
    q, k, v = random_qkv(1, 2, 1, 64, 64, 32, dtype=torch.float16, seed=4)
    options = dict(block_size=16, segment_size=32, threshold=0.5)
    kernel = pbs_attention(q, k, v, backend="triton", **options)
    reference = pbs_attention(q, k, v, backend="reference", **options)
    assert bool(torch.isfinite(kernel).all())
    assert relative_error(kernel, reference) < TOLERANCE[torch.float16]


def test_fallbacks():
    q, k, v = random_qkv(1, 2, 2, 40, 60, 16, seed=5)
    with pytest.warns(UserWarning, match="causal=False"):
        out = pbs_attention(q, k, v, block_size=8, segment_size=16, causal=False)
    dense = sa.block_sparse_attention(
        q, k, v, sa.dense_pattern(seq_q=40, seq_k=60, block_q=8, block_k=8, causal=False), causal=False
    )
    assert relative_error(out, dense) < TOLERANCE[torch.float32]
    with pytest.warns(UserWarning, match="offset"):
        pbs_attention(q[:, :, 3:], k, v, block_size=8, segment_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        short = pbs_attention(q[:, :, :8], k[:, :, :16], v[:, :, :16], block_size=8, segment_size=16)
    reference = sa.block_sparse_attention(
        q[:, :, :8], k[:, :, :16], v[:, :, :16], sa.dense_pattern(seq_q=8, seq_k=16, block_q=8, block_k=8)
    )
    assert relative_error(short, reference) < TOLERANCE[torch.float32]


@pytest.mark.parametrize(
    "options, error, match",
    [
        (dict(segment_size=20), ValueError, "multiple of block_size"),
        (dict(block_size=0), ValueError, "block_size"),
        (dict(threshold=0.0), ValueError, "threshold"),
        (dict(keep_first_block=1), TypeError, "keep_first_block"),
        (dict(scale=-1.0), ValueError, "scale"),
    ],
)
def test_bad_options_are_rejected(options, error, match):
    q, k, v = random_qkv(1, 2, 2, 32, 32, 16, seed=0)
    with pytest.raises(error, match=match):
        pbs_attention(q, k, v, **{"block_size": 8, "segment_size": 16, **options})
