"""Attention sinks (gpt-oss: a learned logit per query head in every row's softmax) through
``sa.patch``: prefill on every path (sparse method, sliding-window layers, dense layers, padded
rows), decode steps, gradients to the sinks; against the model's own eager attention (CPU,
float32, tiny random models)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "GptOssConfig"):
    pytest.skip("this transformers has no gpt-oss", allow_module_level=True)

import sparse_attn as sa  # noqa: E402
from sparse_attn.integrations.attention import sdpa_with_sinks, with_sinks  # noqa: E402
from sparse_attn.integrations.cache import cache_keyword  # noqa: E402
from sparse_attn.integrations.records import WHOLE_BATCH  # noqa: E402

SEQ, WINDOW = 96, 24
PATCH = dict(min_seq_len=16, block_q=16, block_k=16, backend="reference")


def _gpt_oss(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_hidden_layers=3, num_local_experts=4, max_position_embeddings=512,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention", "full_attention"],
    )  # fmt: skip
    config._attn_implementation = "eager"  # gpt-oss has no SDPA attention in transformers
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sinks of both signs and sizes, so they matter
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-2.0, 3.0, 4))
    return model


def _ids(batch: int = 2, length: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _brute_force_with_sinks(q, k, v, visible, sinks, scale):
    """softmax([q k^T * scale masked, sink]) @ [v, 0] in float64."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    sink = sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    weights = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return weights @ v


@pytest.mark.parametrize("seq_q", [40, 77])
def test_with_sinks_is_softmax_with_the_sink_logit(seq_q):
    q, k, v = torch.randn(2, 4, seq_q, 16), torch.randn(2, 2, 77, 16), torch.randn(2, 2, 77, 16)
    sinks = torch.tensor([-3.0, 0.0, 1.5, 6.0])
    pattern = sa.random_pattern(batch=2, heads=2, seq_q=seq_q, seq_k=77, density=0.5, block_q=16, block_k=16, seed=2)
    out, lse = sa.block_sparse_attention(q, k, v, pattern, scale=0.3, backend="reference", return_lse=True)
    visible = pattern.expand_heads(4).to_mask().repeat_interleave(16, 2).repeat_interleave(16, 3)
    visible = visible[:, :, :seq_q, :77] & torch.ones(seq_q, 77, dtype=torch.bool).tril(77 - seq_q)
    want = _brute_force_with_sinks(q, k, v, visible, sinks, 0.3)
    assert torch.allclose(with_sinks(out, lse, sinks).double(), want, atol=1e-5)
    # A row that sees no key gives 0 (all the weight on the sink), not NaN.
    assert torch.equal(
        with_sinks(out[..., :1, :], torch.full_like(lse[..., :1], float("-inf")), sinks), out[..., :1, :] * 0
    )


def test_sdpa_with_sinks_matches_brute_force_for_each_mask_kind():
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    sinks = torch.tensor([-1.0, 0.5, 2.0, 4.0])
    causal = torch.ones(9, 12, dtype=torch.bool).tril(3)
    padded = causal[None, None].repeat(2, 1, 1, 1)
    padded[1, :, :, :5] = False  # left padding of the second row
    padded[1, :, 0, :] = False  # and one row that sees nothing
    for mask, visible in ((None, causal), (padded, padded), (torch.where(padded, 0.0, float("-inf")), padded)):
        got = sdpa_with_sinks(q, k, v, mask, sinks, scale=0.25).transpose(1, 2)
        want = _brute_force_with_sinks(q, k, v, visible.expand(2, 4, 9, 12), sinks, 0.25)
        assert torch.allclose(got.double(), want, atol=1e-5)
    one = sdpa_with_sinks(q[:, :, -1:], k, v, None, sinks, scale=0.25).transpose(1, 2)  # a decode step: no mask
    want = _brute_force_with_sinks(q[:, :, -1:], k, v, torch.ones(2, 4, 1, 12, dtype=torch.bool), sinks, 0.25)
    assert torch.allclose(one.double(), want, atol=1e-5)


@pytest.mark.parametrize("padding", [False, True])
def test_patched_dense_matches_the_models_eager_attention_on_every_layer_kind(padding):
    model = _gpt_oss()
    ids = _ids()
    mask = torch.ones_like(ids)
    if padding:
        mask[1, :30] = 0  # left padding: the patch attends row by row
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        sa.patch(model, "dense", **PATCH)
        with sa.record(model) as rec:
            got = model(ids, attention_mask=mask).logits
        sa.unpatch(model)
    kinds = {entry.kind for entry in rec.records}
    assert kinds == {"window", "dense"} or kinds == {"window", "sparse"}, kinds
    real = mask.bool()
    assert float((got - want)[real].abs().max()) <= 1e-4


def test_patched_sparse_method_keeps_its_pattern_and_the_sinks():
    """A sparse method's output with sinks equals the pattern's attention with the sink logit."""
    model = _gpt_oss()
    ids = _ids(batch=1)
    layer = model.model.layers[1].self_attn
    with torch.no_grad():
        sa.patch(model, "streaming", sink_tokens=16, local_tokens=32, **PATCH)
        with sa.record(model, capture=True) as rec:
            model(ids)
        sa.unpatch(model)
        q, k, v = rec.tensors[(1, WHOLE_BATCH)]
        pattern = sa.estimate(q, k, "streaming", sink_tokens=16, local_tokens=32, block_q=16, block_k=16)
        out, lse = sa.block_sparse_attention(
            q, k, v, pattern, scale=layer.scaling, backend="reference", return_lse=True
        )
        visible = pattern.expand_heads(4).to_mask().repeat_interleave(16, 2).repeat_interleave(16, 3)
        visible = visible & torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
        want = _brute_force_with_sinks(q, k, v, visible, layer.sinks, layer.scaling)
    assert torch.allclose(with_sinks(out, lse, layer.sinks).double(), want, atol=1e-5)
    assert {entry.kind for entry in rec.records} == {"window", "sparse"}


def test_generation_with_sinks_matches_the_unpatched_model():
    model = _gpt_oss()
    ids = _ids(batch=1)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False)
        sa.patch(model, "dense", **PATCH)
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
        cache = {cache_keyword(model): transformers.DynamicCache(config=model.config)}
        prefill = model(ids, use_cache=True, **cache).logits
        step = model(want[:, SEQ : SEQ + 1], use_cache=True, **cache).logits
        sa.unpatch(model)
        full = model(want[:, : SEQ + 1]).logits
    assert torch.equal(got, want)
    assert float((prefill - full[:, :SEQ]).abs().max()) <= 1e-4
    assert float((step[:, -1] - full[:, SEQ]).abs().max()) <= 1e-4  # the decode step, through sdpa_with_sinks


def test_gradients_reach_the_sinks_as_in_eager_attention():
    ids = _ids(batch=1)
    grads = []
    for patched in (False, True):
        model = _gpt_oss()
        if patched:
            sa.patch(model, "dense", **PATCH)
        model(ids, labels=ids).loss.backward()
        grads.append([layer.self_attn.sinks.grad.clone() for layer in model.model.layers])
        grads[-1].append(model.model.layers[1].self_attn.q_proj.weight.grad.clone())
    for got, want in zip(grads[1], grads[0], strict=True):
        assert want.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_decode_method_refuses_a_model_with_sinks():
    with pytest.raises(ValueError, match="attention sinks"):
        sa.patch(_gpt_oss(), "dense", decode_method="quest", **PATCH)


@pytest.mark.gpu
def test_gpu_sinks_through_the_kernels_match_eager_attention():
    """On CUDA every path runs a kernel with its log-sum-exp (the window by its token rule)."""
    model = _gpt_oss().cuda().to(torch.bfloat16)
    ids = _ids(batch=2, length=300).cuda()
    with torch.no_grad():
        want = model(ids).logits.float()
        sa.patch(model, "dense", min_seq_len=16, block_q=64, block_k=64)
        got = model(ids).logits.float()
        sa.unpatch(model)
    assert float((got - want).norm() / want.norm()) <= 2e-2
