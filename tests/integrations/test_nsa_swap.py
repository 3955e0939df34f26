"""swap_in_nsa on tiny randomly initialized transformers models: training step, cached decoding, limits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import TOLERANCE, prefill_and_decode, prompt, tiny_model  # noqa: E402

from sparse_attn.nn.nsa_models import swap_in_nsa  # noqa: E402

# Blocks small enough that a 64-token prompt has several compression and selection blocks.
OPTIONS = dict(compress_block=8, compress_stride=4, select_block=16, select_top_n=3, window=16)


@pytest.mark.parametrize("kind, start", [("llama", "dense"), ("qwen3", "paper")])
def test_swapped_model_trains_and_decodes_with_its_cache(kind, start):
    model = swap_in_nsa(tiny_model(kind), start=start, **OPTIONS)
    ids = prompt(64)
    model.train()
    model(ids, labels=ids).loss.backward()
    attention = model.model.layers[0].self_attn
    # The dense start's compressor MLP is a residual whose last layer starts at zero: that layer
    # learns first (the layer before it gets no gradient until then).
    mlp_layer = attention.nsa.compress_k.mlp[2 if start == "dense" else 0]
    for parameter in (attention.nsa.gate_bias, mlp_layer.weight, attention.q_proj.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        cached = prefill_and_decode(model, ids[:, :40], steps=4)
        tokens, previous = ids[:, :40], cached[0]
        # Each decode step (one query over the cache) equals the last row of a full recompute.
        for step_logits in cached[1:]:
            tokens = torch.cat([tokens, previous[:, -1:].argmax(-1)], dim=1)
            full = model(tokens, use_cache=False).logits[:, -1]
            torch.testing.assert_close(step_logits[:, -1], full, atol=TOLERANCE, rtol=TOLERANCE)
            previous = step_logits


def test_the_dense_start_is_close_to_the_dense_model():
    """With every visible block selected (48 tokens, 3 selected blocks of 16), the dense start's
    output is nearly the selected branch, i.e. dense attention; the paper's start is not."""
    ids = prompt(48)
    dense = tiny_model("llama")
    with torch.no_grad():
        expected = dense(ids).logits
    errors = {}
    for start in ("dense", "paper"):
        model = tiny_model("llama")
        model.load_state_dict(dense.state_dict())
        swap_in_nsa(model, start=start, **OPTIONS)
        with torch.no_grad():
            errors[start] = float((model(ids).logits - expected).norm() / expected.norm())
    assert errors["dense"] < 0.05 < 0.3 < errors["paper"], errors
    nsa = model.model.layers[0].self_attn.nsa
    assert nsa.compressor == "mlp" and torch.equal(nsa.gate_bias, torch.zeros_like(nsa.gate_bias))


def test_start_options_and_overrides():
    model = swap_in_nsa(tiny_model("llama"), compress_block=8, compress_stride=4, select_block=16, window=16)
    nsa = model.model.layers[0].self_attn.nsa
    assert nsa.compressor == "mean_mlp"
    assert torch.equal(nsa.gate_bias[0], torch.tensor([-4.0, 4.0, -4.0]))
    model = swap_in_nsa(tiny_model("llama"), compressor="mean", gate_bias=(0, 1, 2), **OPTIONS)
    nsa = model.model.layers[0].self_attn.nsa
    assert nsa.compressor == "mean" and torch.equal(nsa.gate_bias[1], torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="start"):
        swap_in_nsa(tiny_model("llama"), start="pretrained", **OPTIONS)


def test_padded_batches_are_refused():
    model = swap_in_nsa(tiny_model("llama"), **OPTIONS)
    ids = prompt(32, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="padding"), torch.no_grad():
        model(ids, attention_mask=mask)


def test_swapped_model_trains_under_autocast():
    """Under torch.autocast q and k reach the attention function in float32 beside a bfloat16 v: NSA
    computes in the autocast dtype (its selection in float32), forward and backward."""
    model = tiny_model("llama")
    swap_in_nsa(model, compress_block=8, compress_stride=4, select_block=16, select_top_n=2, window=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=prompt(), labels=prompt()).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_compressed_tokens_live_in_the_cache_and_crops_clear_them():
    """Decode steps keep each layer's compressed tokens on the transformers cache object; a crop
    (assisted decoding) clears them, so steps after it equal a full recompute of the new tokens."""
    from sparse_attn.integrations.cache import cache_keyword
    from sparse_attn.nn.nsa_models import STATE_ATTRIBUTE

    model = swap_in_nsa(tiny_model("llama"), **OPTIONS).eval()
    ids = prompt(60)
    cache = transformers.DynamicCache(config=model.config)
    keyword = {cache_keyword(model): cache}
    with torch.no_grad():
        model(ids[:, :40], use_cache=True, **keyword)
        for step in range(40, 47):
            model(ids[:, step : step + 1], use_cache=True, **keyword)
        states = cache.__dict__[STATE_ATTRIBUTE]
        assert len(states) == model.config.num_hidden_layers
        assert all(state.count == (47 - 8) // 4 + 1 and state.seq_k == 47 for state in states.values())
        cache.crop(-5)  # drop 5 of 47 tokens (a negative count: every transformers version), then go on differently
        assert all(state.count == 0 for state in states.values())
        other = (ids[:, 42:50] + 7) % model.config.vocab_size
        tokens = torch.cat([ids[:, :42], other], dim=1)
        for step in range(42, 50):
            logits = model(tokens[:, step : step + 1], use_cache=True, **keyword).logits[:, -1]
            full = model(tokens[:, : step + 1], use_cache=False).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=TOLERANCE, rtol=TOLERANCE)
