"""sa.record on tiny randomly initialized transformers models: records, table, and why nothing ran."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from tiny_models import PATCH, SEQ, prefill_and_decode, prompt, tiny_model  # noqa: E402

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations import patch, record  # noqa: E402
from sparse_attn.integrations.records import WHOLE_BATCH, pattern_head_density  # noqa: E402

pytestmark = pytest.mark.filterwarnings("error::FutureWarning")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def test_sparse_method_changes_the_result_and_is_recorded():
    model = tiny_model("llama")
    ids = prompt()
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
    assert recorder.no_method_reason is None


def test_table_says_all_for_the_whole_batch_and_the_row_for_padded_rows():
    model = tiny_model("llama")
    patch(model, "random", density=0.5, **PATCH)
    with record(model) as whole:
        model(prompt(batch=2))
    assert {r.row for r in whole.records} == {WHOLE_BATCH}
    assert all(line.split()[1] == "all" for line in whole.table().splitlines()[2:])
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :10] = 0  # left padding: each row runs on its own span
    with record(model) as padded:
        model(prompt(batch=2), attention_mask=mask)
    assert {r.row for r in padded.records} == {0, 1}
    assert sorted(line.split()[1] for line in padded.table().splitlines()[2:]) == ["0", "0", "1", "1"]


def test_record_captures_what_each_layer_attended_with():
    model = tiny_model("gemma3")
    patch(model, "xattention", threshold=0.5, **PATCH)
    ids = prompt()
    with record(model, capture=True) as recorder:
        model(ids)
    sparse = {r.layer: r for r in recorder.records if r.kind == "sparse"}
    assert sparse and set(recorder.tensors) == {(layer, -1) for layer in sparse}
    for (layer, _), (q, k, v) in recorder.tensors.items():
        assert q.shape[:3] == (1, model.config.num_attention_heads, ids.shape[1])
        assert k.shape == v.shape and k.shape[1] == model.config.num_key_value_heads
        # Estimating again on the captured tensors reproduces the layer's recorded pattern.
        pattern = sa.estimate(q, k, "xattention", block_q=PATCH["block_q"], block_k=PATCH["block_k"], threshold=0.5)
        assert pattern_head_density(pattern) == sparse[layer].head_density
    with record(model) as plain:
        model(ids)
    assert plain.tensors == {}


def test_a_prompt_shorter_than_min_seq_len_is_named_with_both_numbers():
    model = tiny_model("llama")
    patch(model, "random", density=0.3, **PATCH)
    message = r"no layer ran the method: prefill of 12 tokens is shorter than min_seq_len=16"
    with pytest.warns(UserWarning, match=message), record(model) as recorder:
        model(prompt(length=12))
    assert recorder.records == []
    assert recorder.no_method_reason.startswith("no layer ran the method: prefill of 12 tokens")
    table = recorder.table()
    assert "2 layer call(s) ran transformers' SDPA: prefill of 12 tokens is shorter than min_seq_len=16" in table
    assert table.splitlines()[-1] == recorder.no_method_reason


def test_decode_steps_are_counted_and_a_long_prefill_runs_the_method():
    model = tiny_model("llama")
    patch(model, "random", density=0.3, **PATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the method ran: no warning
        with record(model) as recorder:
            prefill_and_decode(model, prompt(), steps=3)
    assert recorder.no_method_reason is None
    assert dict(recorder.sdpa_calls) == {"decode step (one query token; decode steps always run SDPA)": 6}


def test_every_layer_dense_or_sliding_is_explained():
    model = tiny_model("gemma3")  # layers 0, 2 slide (window 24); layer 1 is full attention
    patch(model, "random", density=0.3, dense_layers=[1], **PATCH)
    with pytest.warns(UserWarning, match=r"layers \[0, 2\] ran exact sliding-window attention.*layers \[1\] are in"):
        with record(model) as recorder:
            model(prompt())
    assert {r.kind for r in recorder.records} == {"window", "dense"}
    assert "dense_layers" in recorder.table().splitlines()[-1]


def test_no_forward_pass_is_explained():
    model = tiny_model("llama")
    patch(model, "random", density=0.3, **PATCH)
    with pytest.warns(UserWarning, match="no attention call ran inside record"), record(model) as recorder:
        pass
    assert recorder.records == []


def test_an_error_inside_record_is_not_masked_by_a_warning():
    model = tiny_model("llama")
    patch(model, "random", density=0.3, **PATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(KeyError), record(model):
            raise KeyError("inside")


def test_auto_layers_report_the_method_chosen_per_head():
    from sparse_attn.methods.auto import auto_layer_methods

    model = tiny_model("llama")
    layers = auto_layer_methods([0, 1], candidates=("streaming", "dense"), recall=0.5)
    patch(model, layer_methods=layers, **PATCH)
    with record(model) as recorder:
        model(prompt())
    for entry in recorder.records:
        assert entry.method == "auto"
        assert len(entry.head_methods) == len(entry.head_density) and entry.head_methods
        assert set(entry.head_methods) <= {
            "streaming()",
            "dense()",
            "dense",
        }  # labels: name(options); "dense" = none met the budget
    assert "chosen per head:" in recorder.table()
    assert recorder.records[0].head_methods == tuple(layers[0][1]["state"].last.names(0))
