"""swap_in_nsa on tiny randomly initialized transformers models: training step, cached decoding, limits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import TOLERANCE, prefill_and_decode, prompt, tiny_model  # noqa: E402

from sparse_attn.nn.nsa_models import swap_in_nsa  # noqa: E402

# Blocks small enough that a 64-token prompt has several compression and selection blocks.
OPTIONS = dict(compress_block=8, compress_stride=4, select_block=16, select_top_n=3, window=16)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_swapped_model_trains_and_decodes_with_its_cache(kind):
    model = swap_in_nsa(tiny_model(kind), **OPTIONS)
    ids = prompt(64)
    model.train()
    model(ids, labels=ids).loss.backward()
    attention = model.model.layers[0].self_attn
    for parameter in (attention.nsa.gate_bias, attention.nsa.compress_k.mlp[0].weight, attention.q_proj.weight):
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
