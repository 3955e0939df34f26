"""Sparse decode through transformers: SparseDecodeCache + patch(decode_method=...) on tiny random models (CPU)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import (  # noqa: E402
    PATCH,
    TOLERANCE,
    WINDOW,
    max_difference,
    prefill_and_decode,
    prompt,
    tiny_model,
)

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations.decode import SparseDecodeCache  # noqa: E402

DECODE_METHODS = ("dense", "streaming", "quest", "double_sparsity", "tidaldecode", "moba", "retrieval")
# Options the small budgets need: moba's blocks of one page, retrieval's static part under the budget.
SMALL_OPTIONS = {"moba": {"block_size": 16}, "retrieval": {"window_tokens": 8, "update_tokens": 8, "cluster_size": 4}}
DENSE_PREFILL = dict(PATCH, method="dense")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _generate(model, ids, cache=None, steps=10):
    extra = {} if cache is None else {"cache": cache}
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False, **extra)


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma3", "mistral"])
def test_generate_with_a_covering_budget_gives_the_dense_greedy_tokens(kind):
    model = tiny_model(kind)
    ids = prompt(40, batch=2)
    expected = _generate(model, ids)
    for method in DECODE_METHODS:
        options = {"token_budget": 64, **SMALL_OPTIONS.get(method, {})}
        sa.patch(model, **DENSE_PREFILL, decode_method=method, decode_options=options)
        cache = SparseDecodeCache(model, page_size=16)
        if method == "double_sparsity":
            cache.calibrate(prompt(24, seed=5))
            assert set(cache.label_channels) == set(range(len(cache.layers)))
        with sa.record(model) as rec:
            got = _generate(model, ids, cache)
        sa.unpatch(model)
        assert torch.equal(got, expected), method
        # Full-attention layers ran the decode method; sliding layers (past their 24-token window
        # here) read exactly their window through the paged kernel.
        layers = len(cache.layers)
        assert len(rec.decode_records) == 9 * layers and not rec.sdpa_calls, method
        windows = [r for r in rec.decode_records if r.method.startswith("window")]
        assert len(windows) == 9 * {"gemma3": 2, "mistral": 2}.get(kind, 0)
        assert all(r.tokens_read == WINDOW for r in windows)
        assert all(r.pages_read == r.pages for r in rec.decode_records if r.select_block == r.page_size)


def test_a_small_budget_reads_fewer_pages_and_record_shows_them():
    model = tiny_model("llama")
    ids = prompt(96, batch=1)
    sa.patch(model, **DENSE_PREFILL, decode_method="quest", decode_options={"token_budget": 32, "dense_layers": 1})
    with sa.record(model) as rec:
        _generate(model, ids, SparseDecodeCache(model, page_size=16), steps=4)
    sa.unpatch(model)
    by_layer = {r.layer: r for r in rec.decode_records}
    assert by_layer[0].pages_read == by_layer[0].pages == 7  # dense layer: 97..99 tokens in 7 pages
    assert by_layer[1].pages_read == 2 and by_layer[1].entries_read == 2
    assert "decode: 6 layer step(s)" in rec.table() and rec.no_method_reason is None


def test_the_cache_matches_a_dynamic_cache_unpatched_and_with_chunked_prefill():
    model = tiny_model("qwen2")
    ids = prompt(50)
    expected = prefill_and_decode(model, ids, steps=3, chunks=3)
    original = transformers.DynamicCache
    try:
        transformers.DynamicCache = lambda config: SparseDecodeCache(model, page_size=8)
        unpatched = prefill_and_decode(model, ids, steps=3, chunks=3)
        sa.patch(model, **DENSE_PREFILL, decode_method="quest", decode_options={"token_budget": 64})
        patched = prefill_and_decode(model, ids, steps=3, chunks=3)
        sa.unpatch(model)
    finally:
        transformers.DynamicCache = original
    assert max_difference(unpatched, expected) <= TOLERANCE
    assert max_difference(patched, expected) <= TOLERANCE


def test_decode_options_are_checked_at_patch_time():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown decode method 'nope'"):
        sa.patch(model, **DENSE_PREFILL, decode_method="nope")
    with pytest.raises(ValueError, match="token_budget must be >= 1"):
        sa.patch(model, **DENSE_PREFILL, decode_method="quest", decode_options={"token_budget": 0})
    with pytest.raises(TypeError, match="has no option"):
        sa.patch(model, **DENSE_PREFILL, decode_method="quest", decode_options={"budget": 8})
    with pytest.raises(ValueError, match="decode_options given without a decode_method"):
        sa.patch(model, **DENSE_PREFILL, decode_options={"token_budget": 8})
    sa.patch(model, **DENSE_PREFILL, decode_method="double_sparsity")
    with pytest.raises(ValueError, match="calibrated label channels"):
        _generate(model, prompt(20), SparseDecodeCache(model), steps=2)
    with pytest.raises(ValueError, match="page_size must be >= 1"):
        SparseDecodeCache(model, page_size=0)
    sa.unpatch(model)
