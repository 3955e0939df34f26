"""SALE and AnchorAttention: the patterns against token-level brute forces of the papers' rules,
planted structure, monotone knobs, valid patterns on any shape, chunking, config errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import naive_attention, random_qkv, relative_error
from planted import PlantedSpec, planted_blocks, planted_qkv

import sparse_attn as sa
from sparse_attn.geometry import num_blocks
from sparse_attn.ops import to_pattern
from sparse_attn.ops.lowbit import dequantize, quantize, sequence_mean
from sparse_attn.ops.static_masks import sink_local_block_mask
from sparse_attn.pattern import BlockSparsePattern

PLANTED = PlantedSpec(needle_shared_by_group=True)
# Region sizes of one 16-token block, so that the planted structure is what must be found.
SMALL_REGION = {
    "sale": dict(sink_tokens=16, local_tokens=16),
    "anchor": dict(init_tokens=16, local_tokens=16, step=4),
}


@functools.cache
def planted_inputs():
    return planted_qkv(PLANTED)


def token_keys(seq_q, seq_k, block_q, block_k, blocks, causal):
    keys = blocks.repeat_interleave(block_q, -2).repeat_interleave(block_k, -1)[..., :seq_q, :seq_k]
    if causal:
        keys = keys & (torch.arange(seq_k)[None, :] <= (torch.arange(seq_q) + seq_k - seq_q)[:, None])
    return keys


def logits64(q, k):
    group = q.shape[1] // k.shape[1]
    return q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)


def per_block_any(rows_true, block_q, block_k, n_q, n_kv):
    """(B, H, Sq, Sk) bool -> (B, H, n_q, n_kv): a block is True when any of its entries is."""
    padded = torch.nn.functional.pad(
        rows_true, (0, n_kv * block_k - rows_true.shape[-1], 0, n_q * block_q - rows_true.shape[-2])
    )
    return padded.view(*padded.shape[:2], n_q, block_q, n_kv, block_k).any(5).any(3)


def region_of(seq_q, seq_k, block_q, block_k, sink_tokens, local_tokens, causal):
    """The anchor region: its blocks ``(n_q, n_kv)`` and its keys per query row ``(Sq, Sk)``."""
    blocks = sink_local_block_mask(
        seq_q,
        seq_k,
        block_q,
        block_k,
        sink_blocks=num_blocks(sink_tokens, block_k),
        local_blocks=num_blocks(local_tokens, block_k),
        causal=causal,
    )
    return blocks, token_keys(seq_q, seq_k, block_q, block_k, blocks, causal)


def sale_reference(q, k, *, threshold, fmt, sink_tokens, local_tokens, block_q, block_k, causal):
    """SALE's rule token by token in float64 (quantised codes from the tested quantize operator)."""
    seq_q, seq_k = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    q_mean, k_mean = sequence_mean(q), sequence_mean(k)
    q_hat = dequantize(*quantize(q, fmt, center=q_mean))
    k_hat = dequantize(*quantize(k, fmt, center=k_mean))
    estimated = (logits64(q_hat, k_hat) + logits64(q_mean, k - k_mean)) * scale
    region_blocks, region = region_of(seq_q, seq_k, block_q, block_k, sink_tokens, local_tokens, causal)
    smoothed = logits64(q, k - k_mean) * scale
    lse = torch.logsumexp(smoothed.masked_fill(~region, float("-inf")), -1, keepdim=True)
    visible = token_keys(seq_q, seq_k, block_q, block_k, torch.ones(n_q, n_kv, dtype=torch.bool), causal)
    reached = (torch.exp(estimated - lse) >= threshold) & visible
    blocks = per_block_any(reached, block_q, block_k, n_q, n_kv) | region_blocks
    return BlockSparsePattern.from_mask(
        blocks, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )


def anchor_reference(q, k, *, theta, step, init_tokens, local_tokens, block_q, block_k, causal):
    """AnchorAttention's rule token by token in float64."""
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    scale = q.shape[-1] ** -0.5
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    region_blocks, region = region_of(seq_q, seq_k, block_q, block_k, init_tokens, local_tokens, causal)
    row_max = (logits64(q, k) * scale).masked_fill(~region, float("-inf")).amax(-1)
    selected = torch.zeros(batch, heads, n_q, n_kv, dtype=torch.bool)
    offset = seq_k - seq_q
    for i in range(n_q):
        rows = slice(i * block_q, min(seq_q, (i + 1) * block_q))
        anchor = row_max[:, :, rows].mean(-1)
        pooled = q[:, :, rows].double().mean(2, keepdim=True)
        stripes = (logits64(pooled, k) * scale)[:, :, 0]
        if causal:
            stripes = stripes.masked_fill(torch.arange(seq_k) > offset + rows.stop - 1, float("-inf"))
        keep = stripes >= (anchor - theta)[..., None]
        padded = torch.nn.functional.pad(keep, (0, n_kv * block_k - seq_k))
        selected[:, :, i] = padded.view(batch, heads, n_kv, block_k).any(-1)
    for first in range(0, n_q, step):
        group = slice(first, min(n_q, first + step))
        selected[:, :, group] = selected[:, :, group].any(2, keepdim=True)
    first_query = (torch.arange(n_q) // step) * step * block_q + offset
    kv_start = torch.arange(n_kv) * block_k
    kv_end = kv_start + block_k - 1
    if causal:
        dense = kv_end[None, :] >= (first_query // block_k * block_k)[:, None]
    else:
        group_last_query = torch.clamp((torch.arange(n_q) // step + 1) * step * block_q, max=seq_q) - 1 + offset
        dense = (kv_end[None, :] >= (first_query // block_k * block_k)[:, None]) & (
            kv_start[None, :] <= group_last_query[:, None]
        )
    sinks = kv_start < num_blocks(init_tokens, block_k) * block_k
    blocks = selected | dense | sinks[None, :]
    return BlockSparsePattern.from_mask(
        blocks, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal
    )


REFERENCES = {"sale": sale_reference, "anchor": anchor_reference}
OPTIONS = {
    "sale": [dict(threshold=0.1, fmt="int4"), dict(threshold=0.3, fmt="fp8")],
    "anchor": [dict(theta=1.0, step=2), dict(theta=0.5, step=3)],
}
SHAPES = [
    # batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k
    (2, 4, 1, 45, 45, 32, 8, 8),
    (1, 12, 4, 30, 71, 16, 16, 8),
    (1, 6, 3, 33, 33, 64, 8, 16),
]


@pytest.mark.parametrize("method", ["sale", "anchor"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pattern_equals_the_token_level_rule(method, shape):
    batch, q_heads, kv_heads, seq_q, seq_k, dim, block_q, block_k = shape
    q, k, _ = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, dim, seed=seq_q)
    k[:, :, 3] *= 4.0  # a column that stands out, so that the rules keep some blocks and drop others
    region = {"sale": dict(sink_tokens=8, local_tokens=8), "anchor": dict(init_tokens=8, local_tokens=8)}[method]
    densities = []
    for options in OPTIONS[method]:
        for causal in (True, False):
            blocks = dict(block_q=block_q, block_k=block_k, causal=causal)
            pattern = sa.estimate(q, k, method, **blocks, **region, **options)
            expected = REFERENCES[method](q, k, **blocks, **region, **options).to_mask()
            differ = (pattern.to_mask() != expected.expand_as(pattern.to_mask())).float().mean()
            # float32 against float64: only a score within rounding of its threshold may flip.
            assert float(differ) <= 0.005, f"{options}, causal={causal}: {float(differ):.4f} of the blocks differ"
            densities.append(pattern.density(causal=causal))
    assert min(densities) < 1.0, "no setting dropped a block: the comparison would be vacuous"


def test_sale_keeps_the_planted_blocks_and_recall_is_high():
    q, k, _ = planted_inputs()
    pattern = sa.estimate(q, k, "sale", block_q=16, block_k=16, **SMALL_REGION["sale"])
    missing = planted_blocks(PLANTED) & ~pattern.to_mask()[0]
    assert not bool(missing.any()), missing.nonzero().tolist()
    assert pattern.density() < 0.8
    assert sa.metrics.recall(q, k, pattern) > 0.99


def test_anchor_keeps_sinks_vertical_and_needles():
    # Mean-pooled queries average the rotation that draws the planted slash, so AnchorAttention
    # (a stripe method) finds the vertical structure: sinks, the column, the needles.
    q, k, _ = planted_inputs()
    pattern = sa.estimate(q, k, "anchor", block_q=16, block_k=16, theta=8.0, **SMALL_REGION["anchor"])
    kept = pattern.to_mask()[0]
    assert bool(kept[:, :, 0].all())
    column = PLANTED.vertical_position // 16
    assert bool(kept[:, column + 1 :, column].all())
    from planted import needle_blocks

    for head, (q_block, kv_block) in enumerate(needle_blocks(PLANTED)):
        assert bool(kept[head, q_block, kv_block])
    assert sa.metrics.recall(q, k, pattern) > 0.95


@pytest.mark.parametrize(
    "method, knob, values",
    [("sale", "threshold", [0.0005, 0.004, 0.05, 0.5]), ("anchor", "theta", [20.0, 8.0, 5.0, 1.0])],
)
def test_density_falls_as_the_knob_tightens(method, knob, values):
    q, k, _ = planted_inputs()
    densities = [
        sa.estimate(q, k, method, block_q=16, block_k=16, **SMALL_REGION[method], **{knob: value}).density()
        for value in values
    ]
    assert all(a >= b - 1e-9 for a, b in zip(densities, densities[1:], strict=False)), densities
    assert densities[0] > densities[-1]


@pytest.mark.parametrize("method", ["sale", "anchor"])
def test_chunked_estimation_equals_one_chunk(method, monkeypatch):
    q, k, _ = random_qkv(2, 6, 3, 70, 90, 32, seed=5)
    k[:, :, 7] *= 4.0
    options = dict(block_q=8, block_k=8, **SMALL_REGION[method])
    whole = sa.estimate(q, k, method, **options)
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 1)
    chunked = sa.estimate(q, k, method, **options)
    assert torch.equal(whole.to_mask(), chunked.to_mask())


@pytest.mark.parametrize("step", [1, 3, 4])
def test_anchor_captured_rows_are_its_rows(step, monkeypatch):
    """Under capture_rows anchor runs once on the step groups holding the captured blocks (runs of
    consecutive blocks with gaps, the last group partial): exactly the whole pattern's rows."""
    from sparse_attn.ops.to_pattern import RowsCaptured, capture_rows

    q, k, _ = random_qkv(2, 6, 3, 150, 170, 32, seed=6)  # 19 query blocks of 8
    k[:, :, 7] *= 4.0
    options = dict(block_q=8, block_k=8, **{**SMALL_REGION["anchor"], "step": step})
    whole = sa.estimate(q, k, "anchor", **options).to_mask()
    # Chunks of 12 query blocks (row_elements = 2 * 6 heads * 2 * 22 KV blocks): one call holds the
    # groups of every captured block, runs of consecutive blocks with gaps between them.
    monkeypatch.setattr(to_pattern, "CHUNK_ELEMENTS", 2 * 6 * 2 * 22 * 12)
    blocks = (18, 0, 9, 3, 10)
    with capture_rows(blocks), pytest.raises(RowsCaptured) as captured:
        sa.estimate(q, k, "anchor", **options)
    assert torch.equal(captured.value.mask.expand(2, -1, -1, -1), whole[:, :, list(blocks)].expand(2, -1, -1, -1))


@pytest.mark.parametrize("method", ["sale", "anchor"])
def test_sparse_attention_over_the_estimate_matches_the_oracle(method):
    q, k, v = random_qkv(1, 4, 2, 64, 96, 32, seed=2)
    out, info = sa.sparse_attention(q, k, v, method=method, block_q=16, block_k=16, return_info=True)
    expected, _ = naive_attention(q, k, v, info.pattern, causal=True)
    assert relative_error(out, expected) < 1e-4


def test_sale_bfloat16_inputs_give_a_valid_pattern_close_to_float32():
    q, k, _ = planted_inputs()
    full = sa.estimate(q, k, "sale", block_q=16, block_k=16, **SMALL_REGION["sale"]).to_mask()
    half = sa.estimate(q.bfloat16(), k.bfloat16(), "sale", block_q=16, block_k=16, **SMALL_REGION["sale"])
    half.validate()
    assert float((half.to_mask() != full).float().mean()) < 0.02


@pytest.mark.parametrize(
    "method, field, value, error",
    [
        ("sale", "threshold", 0.0, ValueError),
        ("sale", "fmt", "int8", ValueError),
        ("sale", "sink_tokens", 0, ValueError),
        ("sale", "local_tokens", 1.5, TypeError),
        ("anchor", "theta", -1.0, ValueError),
        ("anchor", "theta", "x", TypeError),
        ("anchor", "step", 0, ValueError),
        ("anchor", "init_tokens", 0, ValueError),
    ],
)
def test_config_validation_names_the_field(method, field, value, error):
    with pytest.raises(error, match=field):
        sa.get_method(method).make_config(**{field: value})


def test_sale_threshold_is_a_relative_attention_score():
    # One key carries exp(10) more weight than the region: its score is about e^10 >> 1, kept at any threshold.
    q = torch.zeros(1, 1, 64, 16)
    k = torch.zeros(1, 1, 64, 16)
    q[..., 0] = 1.0
    k[:, :, 20, 0] = 10.0 * math.sqrt(16)
    pattern = sa.estimate(q, k, "sale", block_q=16, block_k=16, threshold=0.99, sink_tokens=1, local_tokens=1)
    assert bool(pattern.to_mask()[0, 0, 2:, 1].all())  # block 1 (keys 16-31) for every later query block
    assert not bool(pattern.to_mask()[0, 0, 3, 2])


@pytest.mark.parametrize("method", ["sale", "anchor"])
def test_kernels_give_the_reference_pattern(method, monkeypatch):
    # The estimators' block maxima (anchor), block margins (sale) and region statistics through
    # the Triton kernels (interpreter) instead of the references.
    import sparse_attn.ops.anchor_region as anchor_region
    import sparse_attn.ops.block_max as block_max
    import sparse_attn.ops.lowbit_block_margin as lowbit_block_margin
    from sparse_attn.ops.anchor_region import triton as anchor_region_triton
    from sparse_attn.ops.block_max import triton as block_max_triton
    from sparse_attn.ops.lowbit_block_margin import triton as margin_triton

    q, k, _ = planted_qkv(PlantedSpec(needle_shared_by_group=True, seq_q=192, seq_k=256, vertical_position=100))
    options = dict(block_q=16, block_k=16, **SMALL_REGION[method], **({"theta": 8.0} if method == "anchor" else {}))
    reference = sa.estimate(q, k, method, **options)
    monkeypatch.setattr(block_max, "kernel_for", lambda *args, **kwargs: block_max_triton)
    monkeypatch.setattr(lowbit_block_margin, "kernel_for", lambda *args, **kwargs: margin_triton)
    monkeypatch.setattr(anchor_region, "kernel_for", lambda *args, **kwargs: anchor_region_triton)
    fused = sa.estimate(q, k, method, **options)
    assert torch.equal(reference.to_mask(), fused.to_mask())
    assert reference.density() < 1.0
