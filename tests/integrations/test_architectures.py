"""``sa.patch`` on more transformers architectures than the main integration tests cover: tiny
random models (CPU, float32), the ``dense`` method against the model's own attention, and a
sparse method running on every full-attention layer. Architectures this transformers lacks are
skipped."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import sparse_attn as sa  # noqa: E402

PATCH = dict(min_seq_len=16, block_q=16, block_k=16, backend="reference")
_COMMON = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_NEOX = dict(
    vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
    max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
_MLA = dict(
    num_key_value_heads=4, moe_intermediate_size=32, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
    qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
)  # fmt: skip
# (config class, its options): GQA everywhere but GPT-NeoX; partial rotary (Phi, GPT-NeoX), QK
# norms (OLMo 2, Qwen 3), logit scalings (Granite, Cohere), mixture-of-experts MLPs, NoPE layers
# (SmolLM3), a parallel attention/MLP block (Cohere, GPT-NeoX).
ARCHITECTURES = {
    "phi3": ("Phi3Config", _COMMON),
    "phi": ("PhiConfig", dict(_COMMON, partial_rotary_factor=0.5)),
    "gpt_neox": ("GPTNeoXConfig", _NEOX),
    "olmo2": ("Olmo2Config", _COMMON),
    "granite": ("GraniteConfig", dict(_COMMON, attention_multiplier=0.3, logits_scaling=2.0)),
    "cohere": ("CohereConfig", _COMMON),
    "starcoder2": ("Starcoder2Config", _COMMON),
    "mixtral": ("MixtralConfig", dict(_COMMON, num_local_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "glm4": ("Glm4Config", dict(_COMMON, head_dim=16)),
    "smollm3": ("SmolLM3Config", _COMMON),
    "stablelm": ("StableLmConfig", _COMMON),
    # Multi-head latent attention: query/key heads of 24 (16 + 8 rotary), value heads of 16.
    "deepseek_v2": ("DeepseekV2Config", dict(_COMMON, **_MLA)),
    "deepseek_v3": ("DeepseekV3Config", dict(_COMMON, **_MLA, n_group=1, topk_group=1)),
}


def _model(name: str):
    class_name, options = ARCHITECTURES[name]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"this transformers has no {class_name}")
    torch.manual_seed(0)
    config = config_class(**options)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_dense_patch_matches_the_model_and_a_method_runs_on_every_layer(name):
    model = _model(name)
    ids = torch.randint(0, 128, (2, 96), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # left padding: row by row
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no "no layer ran the method"
        warnings.filterwarnings("ignore", message=".*zero-padded")  # MLA's value heads: exact, said once
        want = model(ids, attention_mask=mask).logits
        sa.patch(model, "dense", **PATCH)
        got = model(ids, attention_mask=mask).logits
        sa.patch(model, "streaming", sink_tokens=16, local_tokens=32, **PATCH)
        with sa.record(model) as rec:
            model(ids, attention_mask=mask)
        sa.unpatch(model)
    assert float((got - want)[mask.bool()].abs().max()) <= 1e-4
    layers = {entry.layer for entry in rec.records if entry.kind == "sparse"}
    assert layers == set(range(model.config.num_hidden_layers))


def test_soft_capped_attention_is_refused_not_computed_wrong():
    config_class = getattr(transformers, "Gemma2Config", None)
    if config_class is None:
        pytest.skip("this transformers has no Gemma2Config")
    config = config_class(**_COMMON, head_dim=16, sliding_window=24)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="soft-capping"):
        sa.patch(model, "dense", **PATCH)
