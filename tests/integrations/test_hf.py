"""sa.patch / unpatch / record on tiny randomly initialized transformers models (CPU, float32)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations.hf import (  # noqa: E402
    ATTENTION_NAME,
    PrefillMask,
    _pattern_head_density,
    causal_attention,
    patch,
    record,
    sliding_window_attention,
    unpatch,
)

VOCAB = 128
SEQ = 96
WINDOW = 24  # smaller than SEQ, so the sliding layers really slide
TOLERANCE = 1e-4
# Small blocks so a 96-token prompt spans several query and KV blocks; the reference
# backend keeps CPU tests free of compilation.
PATCH = dict(min_seq_len=16, block_q=16, block_k=16, backend="reference")

_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512,
)


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(num_hidden_layers=2, **_COMMON)
    if kind == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=2, **_COMMON)
    if kind == "qwen3":
        return transformers.Qwen3Config(num_hidden_layers=2, head_dim=16, **_COMMON)
    if kind == "mistral":
        return transformers.MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **_COMMON)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(
            num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], **_COMMON,
        )
    raise ValueError(kind)


ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _model(kind: str):
    torch.manual_seed(0)
    config = _config(kind)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _prompt(length: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _prefill_and_decode(model, ids: torch.Tensor, steps: int = 3, chunks: int = 1) -> list[torch.Tensor]:
    """Logits of a (possibly chunked) prefill, then of ``steps`` greedy decode steps with the KV cache."""
    cache = transformers.DynamicCache(config=model.config)
    logits = []
    for part in ids.tensor_split(chunks, dim=1):
        logits.append(model(part, past_key_values=cache, use_cache=True).logits)
    token = logits[-1][:, -1:].argmax(-1)
    for _ in range(steps):
        logits.append(model(token, past_key_values=cache, use_cache=True).logits)
        token = logits[-1][:, -1:].argmax(-1)
    return logits


def _max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_dense_patch_matches_sdpa_prefill_and_decode(kind):
    model = _model(kind)
    ids = _prompt()
    expected = _prefill_and_decode(model, ids)
    patch(model, "dense", **PATCH)
    with record(model) as recorder:
        got = _prefill_and_decode(model, ids)
    assert _max_difference(got, expected) <= TOLERANCE
    # The prefill took the patched path on every layer; decode steps are not recorded.
    assert sorted(r.layer for r in recorder.records) == list(range(model.config.num_hidden_layers))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_chunked_prefill_matches_sdpa(kind):
    """A second long chunk attends to cached keys (Sk > Sq; for Gemma 3 a sliding cache with offset)."""
    model = _model(kind)
    ids = _prompt(length=2 * SEQ)
    expected = _prefill_and_decode(model, ids, steps=1, chunks=2)
    patch(model, "dense", **PATCH)
    assert _max_difference(_prefill_and_decode(model, ids, steps=1, chunks=2), expected) <= TOLERANCE


def test_sliding_layers_run_windowed_and_match_sdpa():
    model = _model("gemma3")
    ids = _prompt()
    expected = model(ids).logits
    patch(model, "dense", **PATCH)
    with record(model) as recorder:
        got = model(ids).logits
    assert float((got - expected).abs().max()) <= TOLERANCE
    kinds = {r.layer: r.kind for r in recorder.records}
    assert kinds == {0: "window", 1: "sparse", 2: "window"}
    window_density = recorder.records[0].density
    assert 0.0 < window_density < 0.5  # a 24-token window over 96 tokens


def test_sliding_window_attention_matches_masked_sdpa():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 50, 8, generator=generator)
    k, v = (torch.randn(2, 2, 70, 8, generator=generator) for _ in range(2))
    position_q = torch.arange(20, 70)[:, None]
    position_k = torch.arange(70)[None, :]
    visible = (position_k <= position_q) & (position_k > position_q - 9)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=visible, scale=0.3
    )
    got = sliding_window_attention(q, k, v, window=9, scale=0.3, chunk=16)
    assert float((got - expected).abs().max()) <= 1e-5
    causal = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=position_k <= position_q, scale=0.3
    )
    assert float((causal_attention(q, k, v, scale=0.3) - causal).abs().max()) <= 1e-5


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_random_at_full_density_matches_dense(kind):
    model = _model(kind)
    ids = _prompt()
    expected = _prefill_and_decode(model, ids, steps=1)
    patch(model, "random", density=1.0, **PATCH)
    assert _max_difference(_prefill_and_decode(model, ids, steps=1), expected) <= TOLERANCE


def test_sparse_method_changes_the_result_and_is_recorded():
    model = _model("llama")
    ids = _prompt()
    expected = model(ids).logits
    patch(model, "random", density=0.3, **PATCH)
    with record(model) as recorder:
        got = model(ids).logits
    assert float((got - expected).abs().max()) > 1e-3
    assert len(recorder.records) == 2
    for entry in recorder.records:
        assert entry.kind == "sparse" and entry.method == "random"
        assert len(entry.head_density) == 2  # one list per KV head
        assert 0.0 < entry.density < 0.7
        assert entry.estimate_ms >= 0.0
    table = recorder.table()
    assert "random" in table and table.count("\n") == 3
    assert recorder.rows()[0]["layer"] == 0


def test_record_captures_what_each_layer_attended_with():
    model = _model("gemma3")
    patch(model, "xattention", threshold=0.5, **PATCH)
    ids = _prompt()
    with record(model, capture=True) as recorder:
        model(ids)
    sparse = {r.layer: r for r in recorder.records if r.kind == "sparse"}
    assert sparse and set(recorder.tensors) == {(layer, -1) for layer in sparse}
    for (layer, _), (q, k, v) in recorder.tensors.items():
        assert q.shape[:3] == (1, model.config.num_attention_heads, ids.shape[1])
        assert k.shape == v.shape and k.shape[1] == model.config.num_key_value_heads
        # Estimating again on the captured tensors reproduces the layer's recorded pattern.
        pattern = sa.estimate(q, k, "xattention", block_q=PATCH["block_q"], block_k=PATCH["block_k"], threshold=0.5)
        assert _pattern_head_density(pattern) == sparse[layer].head_density
    with record(model) as plain:
        model(ids)
    assert plain.tensors == {}


def test_dense_layers_and_layer_methods():
    model = _model("llama")
    patch(model, "random", density=0.3, dense_layers=[0], layer_methods={1: ("random", {"density": 1.0})}, **PATCH)
    ids = _prompt()
    with record(model) as recorder:
        model(ids)
    by_layer = {r.layer: r for r in recorder.records}
    assert by_layer[0].kind == "dense" and by_layer[0].method == "sdpa"
    assert by_layer[1].method == "random" and by_layer[1].density == 1.0


def test_short_prompts_and_unpatch_are_exactly_sdpa():
    model = _model("gemma3")
    ids = _prompt(length=12)  # below min_seq_len: transformers' own SDPA path
    expected = model(ids).logits
    patch(model, "random", density=0.3, **PATCH)
    assert model.config._attn_implementation == ATTENTION_NAME
    with record(model) as recorder:
        assert torch.equal(model(ids).logits, expected)
    assert recorder.records == []
    long_ids = _prompt()
    sparse_logits = model(long_ids).logits
    unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(module, "_sparse_attn_plan") for module in model.modules())
    assert not torch.allclose(model(long_ids).logits, sparse_logits)
    with pytest.raises(ValueError, match="not patched"):
        with record(model):
            pass


def _left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(row.shape[0] for row in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, longest - row.shape[0] :] = row
        mask[index, longest - row.shape[0] :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_left_padded_batch_matches_rows(kind):
    model = _model(kind)
    patch(model, "random", density=0.5, **PATCH)
    rows = [_prompt(SEQ, seed=2)[0], _prompt(SEQ - 30, seed=3)[0]]
    ids, mask, positions = _left_padded(rows)
    batched = model(ids, attention_mask=mask, position_ids=positions).logits
    for index, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        assert float((batched[index, -row.shape[0] :] - alone).abs().max()) <= TOLERANCE


def test_padding_inside_a_row_raises():
    model = _model("llama")
    patch(model, "dense", **PATCH)
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[0, 40:45] = 0
    with pytest.raises(ValueError, match="left or right padding"):
        model(ids, attention_mask=mask)


def test_long_prefill_gets_a_compact_mask():
    model = _model("gemma3")
    patch(model, "dense", **PATCH)
    seen = []
    original = transformers.AttentionInterface._global_mapping[ATTENTION_NAME]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register(ATTENTION_NAME, spy)
    try:
        model(_prompt())
    finally:
        transformers.AttentionInterface.register(ATTENTION_NAME, original)
    assert all(isinstance(mask, PrefillMask) for mask in seen)
    assert [mask.window for mask in seen] == [WINDOW, None, WINDOW]


def test_patch_rejects_bad_options():
    model = _model("llama")
    with pytest.raises(ValueError, match="unknown method"):
        patch(model, "no-such-method")
    with pytest.raises(TypeError, match="no option"):
        patch(model, "random", densty=0.5)
    with pytest.raises(ValueError, match="not attention layers"):
        patch(model, "dense", dense_layers=[7])
    assert model.config._attn_implementation == "sdpa"


def test_static_cache_prefill_falls_back_to_sdpa_with_a_warning():
    """A static cache puts the queries before the end of its key buffer: dense SDPA, said so."""
    model = _model("llama")
    ids = _prompt()
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    patch(model, "random", density=0.3, **PATCH)
    with pytest.warns(UserWarning, match="ran dense SDPA"):
        got = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)
