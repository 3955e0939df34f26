"""SeerAttention: a learned gate per layer scores KV blocks from pooled q and k; keep those above a threshold or the top-k.

Paper: Yizhao Gao, Zhichen Zeng, Dayou Du, Shijie Cao, Hayden Kwok-Hay So, Ting Cao, Fan Yang,
Mao Yang, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024,
arXiv:2410.13276.

Rule: the layer's :class:`~sparse_attn.nn.seer.AttnGate` (average-pooled Q, max/min/average-
pooled K, per-head linear maps, RoPE at block positions; see :mod:`sparse_attn.nn.seer`)
gives block logits per query head; their softmax over the causally valid KV blocks is the
gate's score. A block is kept when its score exceeds ``threshold`` (the released code's
``x > threshold``), or, with ``top_k``, when it is among the ``top_k`` highest-scoring blocks
of its row. Causal: each query block always keeps its diagonal block(s). Lists are per query
head: ``kv_counts`` ``(B, Hq, n_q_blocks)``.

Defaults: ``threshold=2e-3`` when neither option is given (the setting of the released
Llama-3.1-8B gates' LongBench results; the released README quotes 5e-4 to 5e-3 as the
typical range); gate block size 64 (the paper's), set by the gates, not by the API's
``block_q``/``block_k``, which are ignored as for ``moba`` (the pattern carries its own
block sizes).

Gates: trained per model by self-distillation (``benchmarks/train_seer.py``); a layer's gate
is passed as ``gates=`` (an ``AttnGate``; or a :class:`~sparse_attn.nn.seer.SeerGates`, a
gates file path or an embedded model name, with ``layer=``). Gates shipped for the embedded
models live in ``sparse_attn/methods/seer_gates/<model>.pt`` and are used by
:func:`seer_layer_methods`: ``sa.patch(model, layer_methods=seer_layer_methods(model))``
runs ``seer`` on every gated layer with the model's shipped gates. ``sa.patch(model,
method="seer")`` alone cannot know each layer's gate (a method sees q and k only): its first
long prefill raises a ``ValueError`` pointing there.

Choices where the paper leaves room:

- ``top_k`` counts blocks per query block row among the causally valid ones; the diagonal is
  added after the selection (it is not counted). The released code's ``nz_ratio`` (a fraction
  of blocks, with its own square-root conversion) is not offered: ``top_k`` is this
  library's common budget option.
- ``last_blocks_dense=2``: the last two query blocks keep every causally valid block, as the
  released code does by default (``seerattn_last_block_dense=True``, which sets the gate mask's
  last two rows before the causal cut; its evaluation scripts run with it). The paper does not
  mention it. Those rows hold the prompt's last tokens, the ones that generate the answer, and
  a gate trained on the average row can miss what they need: on Gemma 3 270M at 32K with the
  gate's pattern alone, the last query block kept none of a needle's tokens in any head
  (``benchmarks/needle_recall.py``). Its cost is two rows of blocks (under 0.5 % of the causal
  blocks at 32K). ``last_blocks_dense=0`` gives the gate's pattern alone (sessions before
  2026-12-02 had only that).
- Ties at the threshold or the k-th score: ``score > threshold``; ``torch.topk``'s order.
- ``causal=False`` (not in the paper): every block competes; a row left empty keeps its
  last block (the pattern builder's rule).

Operators: the gate's pooling and projections run once per call (``O(S / block * hidden)``);
block logits, softmax and selection run a chunk of query blocks at a time
(:func:`sparse_attn.ops.to_pattern.stream_pattern`), so nothing ``O(S^2)`` is allocated.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_int
from ..nn.seer import AttnGate, SeerGates, embedded_model_name
from ..ops.selection import topk_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method

__all__ = ["DEFAULT_THRESHOLD", "SeerConfig", "shipped_gates", "shipped_gates_path", "seer_layer_methods"]

DEFAULT_THRESHOLD = 2e-3
GATES_FOLDER = Path(__file__).parent / "seer_gates"
TRAIN_HINT = (
    "train them with `python benchmarks/train_seer.py` (self-distillation on the frozen model; see its --help) "
    "and pass them with sa.patch(model, layer_methods=seer_layer_methods(gates))"
)


def shipped_gates_path(name: str) -> Path:
    """Where the shipped gates of embedded model ``name`` live (the file may be absent)."""
    return GATES_FOLDER / f"{name}.pt"


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> SeerGates:
    return SeerGates.load(path)


def _load(path: str | os.PathLike) -> SeerGates:
    """Gates from a file, loaded once per file version (a config may name a path on every call)."""
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise ValueError(f"gates file not found: {str(path)!r}")
    return _load_cached(str(resolved), resolved.stat().st_mtime)


def shipped_gates(name: str) -> SeerGates:
    """The gates shipped for embedded model ``name``; ``ValueError`` saying how to train them when there are none."""
    path = shipped_gates_path(name)
    if not path.is_file():
        shipped = sorted(p.stem for p in GATES_FOLDER.glob("*.pt"))
        raise ValueError(
            f"no trained SeerAttention gates are shipped for {name!r} (shipped: {shipped or 'none'}); {TRAIN_HINT}"
        )
    return _load(path)


def _gate_set(gates) -> SeerGates:
    """A gate set from ``SeerGates``, a gates file path, an embedded model name, or a model loaded by ``sa.models``."""
    if isinstance(gates, SeerGates):
        return gates
    if isinstance(gates, torch.nn.Module) and not isinstance(gates, AttnGate):
        name = embedded_model_name(gates)
        if name is None:
            raise ValueError(f"no shipped SeerAttention gates for this {type(gates).__name__}; {TRAIN_HINT}")
        return shipped_gates(name)
    if isinstance(gates, (str, os.PathLike)):
        path = Path(gates).expanduser()
        if path.suffix == ".pt" or path.exists():
            return _load(path)
        return shipped_gates(os.fspath(gates))
    raise TypeError(
        "gates must be an AttnGate, a SeerGates, a gates file path, an embedded model name or a loaded model, "
        f"got {type(gates).__name__}"
    )


@dataclass(frozen=True)
class SeerConfig:
    gates: object = None
    layer: int | None = None
    threshold: float | None = None
    top_k: int | None = None
    last_blocks_dense: int = 2

    def __post_init__(self) -> None:
        check_int("layer", self.layer, minimum=0, allow_none=True)
        check_int("top_k", self.top_k, allow_none=True)
        check_int("last_blocks_dense", self.last_blocks_dense, minimum=0)
        if self.threshold is not None:
            if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)):
                raise TypeError(f"threshold must be a float, got {type(self.threshold).__name__}")
            if not 0.0 <= self.threshold < 1.0:
                raise ValueError(f"threshold must be in [0, 1) (a gate score), got {self.threshold}")
            if self.top_k is not None:
                raise ValueError("give threshold or top_k, not both")
        if self.gates is None:
            return  # the defaults (listed by `sparse-attn methods`); estimating without gates explains what to do
        if not isinstance(self.gates, AttnGate):
            gate_set = _gate_set(self.gates)
            if self.layer is None and len(gate_set.layers) != 1:
                raise ValueError(f"gates hold layers {gate_set.layers}: choose one with layer=")
            gate_set[gate_set.layers[0] if self.layer is None else self.layer]  # an unknown layer fails here
        elif self.layer is not None:
            raise ValueError("layer selects a layer of a gate set; gates= is already one layer's AttnGate")

    def gate(self) -> AttnGate:
        if self.gates is None:
            raise ValueError(
                "seer needs the trained gate of each layer (gates=...): use "
                "sa.patch(model, layer_methods=sparse_attn.methods.seer.seer_layer_methods(model)) for a model with "
                f"shipped gates (shipped: {sorted(p.stem for p in GATES_FOLDER.glob('*.pt')) or 'none'}), or "
                f"{TRAIN_HINT}"
            )
        if isinstance(self.gates, AttnGate):
            return self.gates
        gate_set = _gate_set(self.gates)
        return gate_set[gate_set.layers[0] if self.layer is None else self.layer]


@register_method(
    "seer",
    config=SeerConfig,
    paper="Gao et al. 2024, SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs (arXiv:2410.13276)",
    summary="learned per-layer gate on pooled q/k (avg; max/min/avg) -> block softmax; threshold or top-k (trained gates)",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: SeerConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Pattern with ``block_q = block_k = gate.block_size``; ``block_q``/``block_k`` are ignored.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` post-RoPE (as attention receives them); lists
    per query head, ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``.
    """
    gate = config.gate().to(q.device)
    inputs = gate.pool(q, k)
    with torch.no_grad():
        projected = gate.project(inputs)
    threshold = DEFAULT_THRESHOLD if config.threshold is None and config.top_k is None else config.threshold
    n_kv = inputs.k.shape[2]
    first_dense = inputs.q.shape[2] - config.last_blocks_dense  # query blocks from here on keep every block

    @torch.no_grad()
    def mask_rows(q_blocks: range) -> torch.Tensor:
        logits = gate.block_logits(inputs, projected, causal=causal, q_blocks=q_blocks)
        if threshold is not None:
            mask = torch.softmax(logits, dim=-1) > threshold
        else:
            # Softmax is monotone: the top-k of the logits are the top-k of the scores. Invalid
            # blocks (-inf) rank last; the pattern builder drops any a short row picks.
            mask = topk_mask(logits, config.top_k)
        if q_blocks.stop > first_dense:
            # Every block of the last rows; the builder keeps only the causally valid ones.
            mask[:, :, max(0, first_dense - q_blocks.start) :] = True
        return mask

    return stream_pattern(
        mask_rows,
        batch=q.shape[0],
        heads=q.shape[1],
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        block_q=gate.block_size,
        block_k=gate.block_size,
        causal=causal,
        device=q.device,
        row_elements=2 * q.shape[0] * q.shape[1] * n_kv,
    )


def seer_layer_methods(gates, **options) -> dict[int, tuple[str, dict]]:
    """``layer_methods`` for :func:`sparse_attn.patch`: ``seer`` on every layer the gates cover, with its own gate.

    ``gates``: a :class:`~sparse_attn.nn.seer.SeerGates`, a gates file, an embedded model name
    (``"smollm2-135m"``: the shipped gates) or a model loaded by ``sa.models.load`` (its
    shipped gates). ``options``: ``threshold`` or ``top_k``. ``ValueError`` saying how to
    train gates when none are shipped for the model. Example::

        model, tokenizer = sa.models.load("smollm2-135m")
        sa.patch(model, layer_methods=seer_layer_methods(model, threshold=2e-3))
    """
    gate_set = _gate_set(gates)
    methods = {layer: ("seer", {**options, "gates": gate_set[layer]}) for layer in gate_set.layers}
    SeerConfig(**next(iter(methods.values()))[1])  # bad options fail here, not at the first forward
    return methods
