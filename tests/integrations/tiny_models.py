"""Tiny randomly initialized transformers causal LMs (CPU, float32) and helpers to run them."""

from __future__ import annotations

import torch
import transformers

from sparse_attn.integrations.cache import cache_keyword

VOCAB = 128
SEQ = 96
WINDOW = 24  # smaller than SEQ, so the sliding layers really slide
TOLERANCE = 1e-4
# Small blocks so a 96-token prompt spans several query and KV blocks; the reference
# backend keeps CPU tests free of compilation.
PATCH = dict(min_seq_len=16, block_q=16, block_k=16, backend="reference")
ARCHITECTURES = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
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
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            **_COMMON,
        )
    raise ValueError(kind)


def tiny_model(kind: str):
    torch.manual_seed(0)
    config = _config(kind)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompt(length: int = SEQ, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(model, ids: torch.Tensor, steps: int = 3, chunks: int = 1) -> list[torch.Tensor]:
    """Logits of a (possibly chunked) prefill, then of ``steps`` greedy decode steps with the KV cache."""
    cache = {cache_keyword(model): transformers.DynamicCache(config=model.config)}
    logits = []
    for part in ids.tensor_split(chunks, dim=1):
        logits.append(model(part, use_cache=True, **cache).logits)
    token = logits[-1][:, -1:].argmax(-1)
    for _ in range(steps):
        logits.append(model(token, use_cache=True, **cache).logits)
        token = logits[-1][:, -1:].argmax(-1)
    return logits


def max_difference(first: list[torch.Tensor], second: list[torch.Tensor]) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))
