"""sa.patch / unpatch on tiny randomly initialized transformers models (CPU, float32)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import (  # noqa: E402
    ARCHITECTURES,
    PATCH,
    SEQ,
    TOLERANCE,
    WINDOW,
    max_difference,
    prefill_and_decode,
    prompt,
    tiny_model,
)

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations import patch, record, unpatch  # noqa: E402
from sparse_attn.integrations.masks import PrefillMask  # noqa: E402
from sparse_attn.integrations.state import ATTENTION_NAME  # noqa: E402

# The integration passes the KV cache the way the installed transformers wants: no FutureWarning.
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_dense_patch_matches_sdpa_prefill_and_decode(kind):
    model = tiny_model(kind)
    ids = prompt()
    expected = prefill_and_decode(model, ids)
    patch(model, "dense", **PATCH)
    # Mistral's tiny config slides on every layer, so no layer runs the method and record says so.
    warns = pytest.warns(UserWarning, match="sliding-window") if kind == "mistral" else contextlib.nullcontext()
    with warns, record(model) as recorder:
        got = prefill_and_decode(model, ids)
    assert max_difference(got, expected) <= TOLERANCE
    # The prefill took the patched path on every layer; decode steps are not recorded.
    assert sorted(r.layer for r in recorder.records) == list(range(model.config.num_hidden_layers))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_chunked_prefill_matches_sdpa(kind):
    """A second long chunk attends to cached keys (Sk > Sq; for Gemma 3 a sliding cache with offset)."""
    model = tiny_model(kind)
    ids = prompt(length=2 * SEQ)
    expected = prefill_and_decode(model, ids, steps=1, chunks=2)
    patch(model, "dense", **PATCH)
    assert max_difference(prefill_and_decode(model, ids, steps=1, chunks=2), expected) <= TOLERANCE


def test_sliding_layers_run_windowed_and_match_sdpa():
    model = tiny_model("gemma3")
    ids = prompt()
    expected = model(ids).logits
    patch(model, "dense", **PATCH)
    with record(model) as recorder:
        got = model(ids).logits
    assert float((got - expected).abs().max()) <= TOLERANCE
    kinds = {r.layer: r.kind for r in recorder.records}
    assert kinds == {0: "window", 1: "sparse", 2: "window"}
    window_density = recorder.records[0].density
    assert 0.0 < window_density < 0.5  # a 24-token window over 96 tokens


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_random_at_full_density_matches_dense(kind):
    model = tiny_model(kind)
    ids = prompt()
    expected = prefill_and_decode(model, ids, steps=1)
    patch(model, "random", density=1.0, **PATCH)
    assert max_difference(prefill_and_decode(model, ids, steps=1), expected) <= TOLERANCE


def test_dense_layers_and_layer_methods():
    model = tiny_model("llama")
    patch(model, "random", density=0.3, dense_layers=[0], layer_methods={1: ("random", {"density": 1.0})}, **PATCH)
    ids = prompt()
    with record(model) as recorder:
        model(ids)
    by_layer = {r.layer: r for r in recorder.records}
    assert by_layer[0].kind == "dense" and by_layer[0].method == "sdpa"
    assert by_layer[1].method == "random" and by_layer[1].density == 1.0


def test_dense_layers_naming_a_sliding_layer_warns_that_it_changes_nothing():
    model = tiny_model("gemma3")  # layers 0 and 2 slide (window 24), layer 1 is full attention
    with pytest.warns(UserWarning, match=r"dense_layers names sliding-window layer\(s\) \[0\] \(window 24 tokens\)"):
        patch(model, "random", density=0.3, dense_layers=[0, 1], **PATCH)
    with pytest.warns(UserWarning, match=r"full-attention layers \[1\]"):
        patch(model, "random", density=0.3, layer_methods={2: "dense"}, **PATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(model, "random", density=0.3, dense_layers=[1], **PATCH)
    # Mistral slides on every layer (no per-layer types in its config).
    with pytest.warns(UserWarning, match=r"\[0\] \(window 24 tokens\).*full-attention layers \[\]"):
        patch(tiny_model("mistral"), "random", density=0.3, dense_layers=[0], **PATCH)


def test_short_prompts_and_unpatch_are_exactly_sdpa():
    model = tiny_model("gemma3")
    ids = prompt(length=12)  # below min_seq_len: transformers' own SDPA path
    expected = model(ids).logits
    patch(model, "random", density=0.3, **PATCH)
    assert model.config._attn_implementation == ATTENTION_NAME
    with pytest.warns(UserWarning, match="no layer ran the method"), record(model) as recorder:
        assert torch.equal(model(ids).logits, expected)
    assert recorder.records == []
    long_ids = prompt()
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
    model = tiny_model(kind)
    patch(model, "random", density=0.5, **PATCH)
    rows = [prompt(SEQ, seed=2)[0], prompt(SEQ - 30, seed=3)[0]]
    ids, mask, positions = _left_padded(rows)
    batched = model(ids, attention_mask=mask, position_ids=positions).logits
    for index, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        assert float((batched[index, -row.shape[0] :] - alone).abs().max()) <= TOLERANCE


def test_padding_inside_a_row_raises():
    model = tiny_model("llama")
    patch(model, "dense", **PATCH)
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, 40:45] = 0
    with pytest.raises(ValueError, match="left or right padding"):
        model(ids, attention_mask=mask)


def test_long_prefill_gets_a_compact_mask():
    model = tiny_model("gemma3")
    patch(model, "dense", **PATCH)
    seen = []
    original = transformers.AttentionInterface._global_mapping[ATTENTION_NAME]

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register(ATTENTION_NAME, spy)
    try:
        model(prompt())
    finally:
        transformers.AttentionInterface.register(ATTENTION_NAME, original)
    assert all(isinstance(mask, PrefillMask) for mask in seen)
    assert [mask.window for mask in seen] == [WINDOW, None, WINDOW]


def test_patch_rejects_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown method"):
        patch(model, "no-such-method")
    with pytest.raises(TypeError, match="no option"):
        patch(model, "random", densty=0.5)
    with pytest.raises(ValueError, match="not attention layers"):
        patch(model, "dense", dense_layers=[7])
    with pytest.raises(TypeError, match="min_seq_len must be an int"):
        patch(model, "dense", min_seq_len=4096.0)
    with pytest.raises(ValueError, match="min_seq_len must be >= 1"):
        patch(model, "dense", min_seq_len=0)
    assert model.config._attn_implementation == "sdpa"


def test_a_model_name_instead_of_a_model_is_a_type_error():
    hint = r"model must be .*got str; load it first: model, tokenizer = sparse_attn\.models\.load\('gemma3-270m'\)"
    with pytest.raises(TypeError, match=hint):
        sa.patch("gemma3-270m")
    with pytest.raises(TypeError, match=hint):
        sa.unpatch("gemma3-270m")
    with pytest.raises(TypeError, match=hint):
        with sa.record("gemma3-270m"):
            pass


def test_static_cache_prefill_falls_back_to_sdpa_with_a_warning():
    """A static cache puts the queries before the end of its key buffer: dense SDPA, said so."""
    model = tiny_model("llama")
    ids = prompt()
    expected = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    patch(model, "random", density=0.3, **PATCH)
    with pytest.warns(UserWarning, match="ran dense SDPA"):
        got = model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(got, expected)


def test_patched_model_runs_under_autocast_as_sdpa_does():
    """Under torch.autocast the model's RoPE leaves q and k in float32 beside a bfloat16 v: the patched
    attention computes in the autocast dtype, as SDPA does, forward and backward."""
    model = tiny_model("llama")
    ids = prompt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(input_ids=ids).logits.float()
    patch(model, method="moba", block_size=4, top_k=1000, min_seq_len=1)  # every block: dense
    try:
        with torch.enable_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # the module's fixture disables grad
            got = model(input_ids=ids).logits.float()
            got.sum().backward()
    finally:
        unpatch(model)
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
