"""Static estimators (streaming, tri_shape, power, strided_shards) against closed forms
written here independently, one block at a time, plus their properties and end-to-end use."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import naive_attention, random_qkv, relative_error
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa

STATIC_METHODS = ["streaming", "tri_shape", "power", "strided_shards"]

# Small sizes so that sinks, windows, dense rows and shards all show at block 16/32.
SMALL_OPTIONS = {
    "streaming": {"sink_tokens": 20, "local_tokens": 40},
    "tri_shape": {"sink_tokens": 16, "local_tokens": 32, "last_q_tokens": 20},
    "power": {"sink_tokens": 16, "local_tokens": 16},
    "strided_shards": {"local_tokens": 32, "stride": 3},
}

# (batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k)
SHAPES = [
    (1, 1, 1, 256, 256, 16, 16),
    (2, 4, 2, 100, 230, 16, 16),
    (1, 6, 3, 77, 77, 32, 16),
    (3, 4, 1, 61, 333, 16, 32),
    (1, 2, 2, 1, 97, 16, 16),
]


# Closed forms ----------------------------------------------------------------------------
def _query_block_geometry(i, seq_q, seq_k, block_q, block_k):
    """First/last own KV block and last absolute position of query block ``i``."""
    offset = seq_k - seq_q
    first_position = offset + i * block_q
    last_position = offset + min((i + 1) * block_q, seq_q) - 1
    return first_position // block_k, last_position // block_k, last_position


def _distance(j, first, last):
    if j < first:
        return first - j
    if j > last:
        return j - last
    return 0


def _expected_mask(keep, seq_q, seq_k, block_q, block_k, causal, heads=1):
    """Bool (heads, n_q, n_kv) from a per-block rule ``keep(head, i, j, first, last)``."""
    n_q, n_kv = math.ceil(seq_q / block_q), math.ceil(seq_k / block_k)
    mask = torch.zeros((heads, n_q, n_kv), dtype=torch.bool)
    for head in range(heads):
        for i in range(n_q):
            first, last, last_position = _query_block_geometry(i, seq_q, seq_k, block_q, block_k)
            for j in range(n_kv):
                kept = keep(head, i, j, first, last)
                if causal:
                    kept = (kept and j * block_k <= last_position) or first <= j <= last
                mask[head, i, j] = kept
    return mask


def _a_shape(j, first, last, sink_tokens, local_tokens, block_k):
    return j * block_k < sink_tokens or _distance(j, first, last) < math.ceil(local_tokens / block_k)


def _expected(method, options, seq_q, seq_k, block_q, block_k, causal, heads):
    if method == "streaming":

        def keep(head, i, j, first, last):
            return _a_shape(j, first, last, options["sink_tokens"], options["local_tokens"], block_k)

    elif method == "tri_shape":

        def keep(head, i, j, first, last):
            rows = range(i * block_q, min((i + 1) * block_q, seq_q))
            dense_row = any(row >= seq_q - options["last_q_tokens"] for row in rows)
            return dense_row or _a_shape(j, first, last, options["sink_tokens"], options["local_tokens"], block_k)

    elif method == "power":

        def keep(head, i, j, first, last):
            distance = _distance(j, first, last)
            is_power = distance > 0 and bin(distance).count("1") == 1
            return is_power or _a_shape(j, first, last, options["sink_tokens"], options["local_tokens"], block_k)

    else:

        def keep(head, i, j, first, last):
            in_window = _distance(j, first, last) < math.ceil(options["local_tokens"] / block_k)
            return in_window or j % options["stride"] == head % options["stride"]

    mask_heads = heads if method == "strided_shards" else 1
    return _expected_mask(keep, seq_q, seq_k, block_q, block_k, causal, mask_heads)


def _estimate(method, shape, causal=True, **options):
    batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k = shape
    q = torch.zeros(1, 1, 1, 8).expand(batch, q_heads, seq_q, 8)
    k = torch.zeros(1, 1, 1, 8).expand(batch, kv_heads, seq_k, 8)
    return sa.estimate(q, k, method, causal=causal, block_q=block_q, block_k=block_k, **options)


# Estimates against the closed forms ---------------------------------------------------
@pytest.mark.parametrize("method", STATIC_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [True, False])
def test_matches_closed_form(method, shape, causal):
    _, q_heads, _, seq_q, seq_k, block_q, block_k = shape
    options = SMALL_OPTIONS[method]
    pattern = _estimate(method, shape, causal, **options)
    expected = _expected(method, options, seq_q, seq_k, block_q, block_k, causal, q_heads)
    expected_heads = q_heads if method == "strided_shards" else 1  # one list shared by every head
    assert pattern.batch == 1 and pattern.num_heads == expected_heads
    assert torch.equal(pattern.to_mask()[0], expected.expand(expected_heads, -1, -1))


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(STATIC_METHODS),
    seq_q=st.integers(1, 90),
    extra_keys=st.integers(0, 90),
    block_q=st.sampled_from([16, 32]),
    block_k=st.sampled_from([16, 32]),
    sink_tokens=st.integers(0, 70),
    local_tokens=st.integers(1, 70),
    last_q_tokens=st.integers(0, 70),
    stride=st.integers(1, 5),
    causal=st.booleans(),
)
def test_matches_closed_form_on_random_geometry(
    method, seq_q, extra_keys, block_q, block_k, sink_tokens, local_tokens, last_q_tokens, stride, causal
):
    all_options = {
        "sink_tokens": sink_tokens,
        "local_tokens": local_tokens,
        "last_q_tokens": last_q_tokens,
        "stride": stride,
    }
    options = {name: all_options[name] for name in SMALL_OPTIONS[method]}
    seq_k = seq_q + extra_keys
    shape = (1, 4, 2, seq_q, seq_k, block_q, block_k)
    pattern = _estimate(method, shape, causal, **options)
    expected = _expected(method, options, seq_q, seq_k, block_q, block_k, causal, heads=4)
    assert torch.equal(pattern.to_mask()[0], expected.expand(pattern.num_heads, -1, -1))
    pattern.validate(causal=causal)


# Properties ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", STATIC_METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_valid_causal_keeps_diagonal_and_deterministic(method, shape):
    pattern = _estimate(method, shape, **SMALL_OPTIONS[method])
    pattern.validate(causal=True)
    mask = pattern.to_mask()
    assert bool((mask | ~pattern.diagonal_block_mask()).all())
    assert not bool((mask & ~pattern.causal_block_mask()).any())
    again = _estimate(method, shape, **SMALL_OPTIONS[method])
    assert torch.equal(pattern.kv_counts, again.kv_counts) and torch.equal(pattern.kv_indices, again.kv_indices)


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_defaults_are_valid(method):
    pattern = _estimate(method, (2, 8, 2, 1000, 3000, 32, 64))
    pattern.validate(causal=True)
    assert 0.0 < pattern.density() <= 1.0


GROWING = {
    "streaming": [{"local_tokens": n, "sink_tokens": s} for n, s in [(1, 0), (16, 0), (16, 16), (48, 16), (400, 64)]],
    "tri_shape": [{"last_q_tokens": n} for n in [0, 1, 17, 40, 100, 1000]],
    "power": [{"local_tokens": n, "sink_tokens": s} for n, s in [(1, 0), (16, 16), (64, 16), (64, 128)]],
    # Each stride divides the one before, so every shard contains the previous one.
    "strided_shards": [{"stride": s, "local_tokens": n} for s, n in [(8, 16), (4, 16), (4, 64), (2, 64), (1, 64)]],
}


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_density_grows_with_budget(method):
    shape = (1, 8, 2, 180, 300, 16, 16)
    patterns = [_estimate(method, shape, **options) for options in GROWING[method]]
    densities = [pattern.density() for pattern in patterns]
    assert densities == sorted(densities)
    for smaller, larger in itertools.pairwise(patterns):
        assert bool((larger.to_mask() | ~smaller.to_mask()).all())


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_heads,stride", [(8, 8), (6, 3), (5, 4)])
def test_strided_shards_union_covers_context(causal, q_heads, stride):
    shape = (1, q_heads, 1, 150, 400, 16, 16)
    pattern = _estimate("strided_shards", shape, causal, local_tokens=16, stride=stride)
    union = pattern.to_mask()[0].any(dim=0)
    valid = pattern.causal_block_mask() if causal else torch.ones_like(union)
    assert torch.equal(union, valid)
    # No single head covers it: each reads about 1 / stride of the context.
    assert not bool(pattern.to_mask()[0, 0].all())


def test_density_at_128k_is_small():
    shape = (1, 32, 8, 131072, 131072, 128, 128)
    densities = {method: _estimate(method, shape).density() for method in STATIC_METHODS}
    assert densities["streaming"] < 0.07  # 32 of ~512 causal blocks per row on average
    assert densities["tri_shape"] < 0.07  # one more dense row of 1024
    assert densities["power"] < 0.04  # ~18 blocks per row
    assert densities["strided_shards"] < 0.15  # 1/8 shard + an 8-block window


# Config validation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,field,bad,error",
    [
        ("streaming", "sink_tokens", -1, ValueError),
        ("streaming", "local_tokens", 0, ValueError),
        ("streaming", "local_tokens", 12.5, TypeError),
        ("tri_shape", "last_q_tokens", -3, ValueError),
        ("tri_shape", "sink_tokens", True, TypeError),
        ("power", "local_tokens", "64", TypeError),
        ("power", "sink_tokens", -128, ValueError),
        ("strided_shards", "stride", 0, ValueError),
        ("strided_shards", "local_tokens", None, TypeError),
    ],
)
def test_config_validation_names_the_field(method, field, bad, error):
    with pytest.raises(error, match=field):
        sa.get_method(method).make_config(**{field: bad})


@pytest.mark.parametrize("method", STATIC_METHODS)
def test_unknown_option_and_listed_defaults(method):
    spec = sa.get_method(method)
    with pytest.raises(TypeError, match="threshold"):
        spec.make_config(threshold=0.9)
    assert spec.defaults() and "arXiv" in spec.paper


# End to end ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", STATIC_METHODS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
def test_reference_end_to_end_matches_naive_oracle(method, causal, shape):
    batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 32, torch.float64, seed=3)
    options = SMALL_OPTIONS[method]
    out, info = sa.sparse_attention(
        q,
        k,
        v,
        method,
        causal=causal,
        backend="reference",
        block_q=block_q,
        block_k=block_k,
        return_info=True,
        **options,
    )
    expected, _ = naive_attention(q, k, v, info.pattern, causal)
    assert relative_error(out, expected) < 1e-10


def test_default_backend_end_to_end_matches_reference():
    # One shape with batch > 1, GQA, Sq < Sk and odd lengths: the CPU default backend (flex)
    # compiles once per shape, which dominates this file's run time.
    shape = SHAPES[1]
    batch, q_heads, kv_heads, seq_q, seq_k, block_q, block_k = shape
    q, k, v = random_qkv(batch, q_heads, kv_heads, seq_q, seq_k, 32, torch.float32, seed=5)
    for method in STATIC_METHODS:
        options = SMALL_OPTIONS[method]
        out = sa.sparse_attention(q, k, v, method=method, block_q=block_q, block_k=block_k, **options)
        pattern = sa.estimate(q, k, method, block_q=block_q, block_k=block_k, **options)
        expected = sa.block_sparse_attention(q, k, v, pattern, backend="reference")
        assert relative_error(out, expected) < 1e-5
