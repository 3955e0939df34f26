"""SeerAttention's AttnGate: a small learned gate that predicts which KV blocks each query block needs.

Paper: Yizhao Gao, Zhichen Zeng, Dayou Du, Shijie Cao, Hayden Kwok-Hay So, Ting Cao, Fan Yang,
Mao Yang, "SeerAttention: Learning Intrinsic Sparse Attention in Your LLMs", 2024,
arXiv:2410.13276 (also "SeerAttention: Self-distilled Attention Gating for Efficient
Long-context Prefilling", NeurIPS 2025).

The gate of one layer (Section 3 of the paper; released code ``seer_attn/prefill_sparse``):

1. Q is average-pooled over each query block; K is pooled over each KV block three ways,
   max, min and average, concatenated along the feature axis (``3 * head_dim`` features).
   Pooling acts on the *pre-RoPE* q and k.
2. Per-head linear maps without bias: pooled Q of each query head ``head_dim -> hidden_size``,
   pooled K of each KV head ``3 * head_dim -> hidden_size`` (K's map is shared by the query
   heads of its GQA group, as in the released code's ``Qavg_Kmaxminavg`` gate when it keeps
   both maps).
3. RoPE in the gate's own ``hidden_size`` space at block positions: a block sits at the
   position of its first token (the released code rotates with ``position_ids[::block]``).
4. Block logits ``(W_q pool(Q)) · (W_k pool(K)) / sqrt(hidden_size)`` per query head, causally
   masked at block level, softmax over KV blocks: ``(B, Hq, n_q_blocks, n_kv_blocks)``.

Training (self-distillation, the model frozen): the target is the frozen model's attention
map, 2D max-pooled per (query block, KV block) and row-normalised
(:func:`sparse_attn.ops.pooled_attention_map.pooled_attention_map`); the loss is the KL
divergence ``KL(target || softmax(gate))`` per query block row. The released training drops
the first quarter of the query blocks from the loss "for training stability"
(:func:`distillation_loss` does the same, ``skip_fraction=0.25``). Hyperparameters of the
released script: AdamW, lr 1e-3, 20 warm-up steps then cosine decay, no weight decay
(:func:`distill`).

Choices where the paper leaves room, or where this library differs:

- The integration hands estimators the *post-RoPE* q and k (transformers applies RoPE before
  the attention function). The gate undoes it: it stores the model's RoPE frequencies per
  layer (``model_inv_freq``, read from the model's rotary embedding, so scaled variants such
  as Llama 3's are exact) and rotates q and k back by their absolute positions (queries are
  the last ``Sq`` of ``Sk`` positions) before pooling. transformers' rotate-half convention;
  a constant ``attention_scaling`` of the model's RoPE is not undone (the learned maps absorb
  it, and training and inference see the same inputs). ``model_inv_freq=None``: q and k are
  taken as they are (a model without RoPE, or inputs already pre-RoPE).
- The gate's own RoPE uses the default frequencies ``theta ** (-2i / hidden_size)`` with the
  model's ``rope_theta``; the released code reuses the model's rotary class (and so its
  scaling, if any) at ``hidden_size``. Identical for models without RoPE scaling (SmolLM2).
- ``hidden_size`` defaults to ``head_dim`` (the released Llama gates use 128 = Llama's
  head_dim); both maps are kept even when ``hidden_size == head_dim`` (the released code then
  drops the Q map). Parameters per layer: ``Hq * D * h + Hkv * 3D * h``.
- Query blocks follow :mod:`sparse_attn.geometry` (cut from the first query; with ``Sq < Sk``
  a query block's RoPE position is its first query's absolute position). A last partial block
  is pooled over its real tokens (the paper's ``ceil_mode`` pooling does the same).
- The loss is the mean over (batch, head, row) of each row's KL (the released code uses
  ``KLDivLoss()``'s element mean times a loss scale of 10; with Adam the constant factor
  hardly matters).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_int
from ..geometry import num_blocks
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops.block_rows import causal_block_rows, query_block_range
from ..ops.gqa import grouped_matmul
from ..ops.pooled_attention_map import pooled_attention_map
from ..ops.pooling import mean_pool_blocks

__all__ = [
    "AttnGate",
    "GateInputs",
    "SeerGates",
    "distill",
    "distillation_loss",
    "distillation_targets",
    "embedded_model_name",
    "mean_distillation_loss",
    "model_rope_frequencies",
    "model_rope_theta",
    "rope_rotate",
    "stack_targets",
]

GATES_FORMAT = "sparse_attn.seer/1"
DEFAULT_BLOCK = 64


def rope_rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, *, inverse: bool = False):
    """Rotate ``x`` ``(..., S, D)`` by RoPE at ``positions`` ``(S,)`` (transformers' rotate-half convention).

    ``inv_freq`` ``(r/2,)`` rotates the first ``r`` features (the rest pass through: partial
    rotary). ``inverse=True`` undoes the rotation. Float32 result.
    """
    rotary = 2 * inv_freq.numel()
    angles = positions.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if inverse:
        sin = -sin
    part = x[..., :rotary].float()
    half = rotary // 2
    rotated = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    out = part * cos + rotated * sin
    return torch.cat([out, x[..., rotary:].float()], dim=-1) if rotary < x.shape[-1] else out


def _extreme_pool_blocks(x: torch.Tensor, block: int, *, largest: bool) -> torch.Tensor:
    """Max (``largest``) or min of each block of ``block`` positions of ``x`` ``(B, H, S, D)``; partial last block too."""
    length = x.shape[2]
    whole = length // block
    reduce = torch.amax if largest else torch.amin
    parts = []
    if whole:
        parts.append(reduce(x[:, :, : whole * block].unflatten(2, (whole, block)), dim=3))
    if whole * block < length:
        parts.append(reduce(x[:, :, whole * block :], dim=2, keepdim=True))
    return torch.cat(parts, dim=2)


@dataclass(frozen=True)
class GateInputs:
    """Pooled pre-RoPE q and k of one call: what the gate's parameters act on (no gradient needed).

    ``q`` float32 ``(B, Hq, n_q, D)`` (average), ``k`` float32 ``(B, Hkv, n_kv, 3 * D)`` (max,
    min, average); ``q_positions`` / ``k_positions`` int64: each block's first absolute position.
    """

    q: torch.Tensor
    k: torch.Tensor
    q_positions: torch.Tensor
    k_positions: torch.Tensor
    seq_q: int
    seq_k: int
    block: int

    def select(self, rows: torch.Tensor) -> GateInputs:
        """The inputs of batch rows ``rows`` (int64 indices)."""
        return GateInputs(self.q[rows], self.k[rows], self.q_positions, self.k_positions, *self._geometry())

    def _geometry(self) -> tuple[int, int, int]:
        return self.seq_q, self.seq_k, self.block

    @staticmethod
    def concat(parts: Sequence[GateInputs]) -> GateInputs:
        """Inputs of several calls of the same geometry stacked along the batch."""
        first = parts[0]
        if any(part._geometry() != first._geometry() for part in parts):
            raise ValueError("GateInputs.concat needs inputs of one geometry (seq_q, seq_k, block)")
        q, k = torch.cat([p.q for p in parts]), torch.cat([p.k for p in parts])
        return GateInputs(q, k, first.q_positions, first.k_positions, *first._geometry())


class AttnGate(torch.nn.Module):
    """The gate of one attention layer (see the module docstring).

    Args:
        q_heads, kv_heads, head_dim: the layer's attention shape (``q_heads % kv_heads == 0``).
        block_size: tokens per query and per KV block (the pattern's ``block_q = block_k``); 64 as the paper.
        hidden_size: the gate's projection width (default ``head_dim``).
        rope_theta: base of the gate's own RoPE at block positions; ``None``: no RoPE in the gate.
        model_inv_freq: float ``(r/2,)``, the model's RoPE frequencies of this layer, to undo
            the rotation of post-RoPE inputs; ``None``: inputs are used as they are.
    """

    def __init__(
        self,
        *,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        block_size: int = DEFAULT_BLOCK,
        hidden_size: int | None = None,
        rope_theta: float | None = 10000.0,
        model_inv_freq: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("q_heads", q_heads), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            check_int(name, value)
        check_int("block_size", block_size)
        check_int("hidden_size", hidden_size, allow_none=True)
        if q_heads % kv_heads:
            raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
        hidden = head_dim if hidden_size is None else hidden_size
        if rope_theta is not None and (hidden % 2 or not rope_theta > 0):
            raise ValueError(
                f"the gate's RoPE needs an even hidden_size and rope_theta > 0, got {hidden}, {rope_theta}"
            )
        if model_inv_freq is not None and (model_inv_freq.dim() != 1 or 2 * model_inv_freq.numel() > head_dim):
            raise ValueError(f"model_inv_freq must be 1-D with at most head_dim / 2 = {head_dim // 2} entries")
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.block_size, self.hidden_size = block_size, hidden
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        # nn.Linear's default initialisation, per head.
        self.q_proj = torch.nn.Parameter(torch.empty(q_heads, head_dim, hidden).uniform_(-1, 1) / math.sqrt(head_dim))
        self.k_proj = torch.nn.Parameter(
            torch.empty(kv_heads, 3 * head_dim, hidden).uniform_(-1, 1) / math.sqrt(3 * head_dim)
        )
        gate_freq = None
        if rope_theta is not None:
            gate_freq = rope_theta ** (-torch.arange(0, hidden, 2, dtype=torch.float64) / hidden)
        self.register_buffer("gate_inv_freq", None if gate_freq is None else gate_freq.float())
        self.register_buffer("model_inv_freq", None if model_inv_freq is None else model_inv_freq.float().clone())

    def extra_repr(self) -> str:
        return (
            f"q_heads={self.q_heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, hidden_size={self.hidden_size}, rope_theta={self.rope_theta}"
        )

    def check_inputs(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """``ValueError`` unless q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` have this gate's heads and head_dim."""
        expected = (self.q_heads, self.kv_heads, self.head_dim)
        got = (q.shape[1], k.shape[1], q.shape[3])
        if got != expected:
            raise ValueError(
                f"gates: this gate was trained for {expected[0]} query heads, {expected[1]} KV heads and "
                f"head_dim {expected[2]}, but q/k have {got[0]}, {got[1]} and {got[2]} (gates of another model?)"
            )

    @torch.no_grad()
    def pool(self, q: torch.Tensor, k: torch.Tensor) -> GateInputs:
        """Pool post-RoPE q ``(B, Hq, Sq, D)`` and k ``(B, Hkv, Sk, D)`` (RoPE undone first when the gate knows it).

        Processed a few heads at a time, so the float32 temporaries stay within ``CHUNK_ELEMENTS``.
        """
        self.check_inputs(q, k)
        seq_q, seq_k, block = q.shape[2], k.shape[2], self.block_size
        device = q.device
        q_positions = torch.arange(seq_q, device=device) + (seq_k - seq_q)
        k_positions = torch.arange(seq_k, device=device)

        def pre_rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            if self.model_inv_freq is None:
                return x.float()
            return rope_rotate(x, positions, self.model_inv_freq.to(device), inverse=True)

        def heads_per_chunk(x: torch.Tensor) -> int:
            return max(1, CHUNK_ELEMENTS // (4 * x.shape[0] * x.shape[2] * x.shape[3]))

        pooled_q = torch.cat(
            [mean_pool_blocks(pre_rope(part, q_positions), block) for part in q.split(heads_per_chunk(q), dim=1)],
            dim=1,
        )
        pooled_k = []
        for part in k.split(heads_per_chunk(k), dim=1):
            keys = pre_rope(part, k_positions)
            pooled_k.append(
                torch.cat(
                    [
                        _extreme_pool_blocks(keys, block, largest=True),
                        _extreme_pool_blocks(keys, block, largest=False),
                        mean_pool_blocks(keys, block),
                    ],
                    dim=-1,
                )
            )
        n_q, n_kv = num_blocks(seq_q, block), num_blocks(seq_k, block)
        return GateInputs(
            q=pooled_q,
            k=torch.cat(pooled_k, dim=1),
            q_positions=q_positions[::block][:n_q],
            k_positions=k_positions[::block][:n_kv],
            seq_q=seq_q,
            seq_k=seq_k,
            block=block,
        )

    def project(self, inputs: GateInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The gate's block queries ``(B, Hq, n_q, h)`` and block keys ``(B, Hkv, n_kv, h)``, RoPE applied, float32."""
        q_proj, k_proj = self.q_proj.float(), self.k_proj.float()
        queries = torch.einsum("bhnd,hde->bhne", inputs.q, q_proj)
        keys = torch.einsum("bhnd,hde->bhne", inputs.k, k_proj)
        if self.gate_inv_freq is not None:
            queries = rope_rotate(queries, inputs.q_positions, self.gate_inv_freq)
            keys = rope_rotate(keys, inputs.k_positions, self.gate_inv_freq)
        return queries, keys

    def block_logits(
        self,
        inputs: GateInputs,
        projected: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        causal: bool = True,
        q_blocks: range | None = None,
    ) -> torch.Tensor:
        """Gate logits of query blocks ``q_blocks`` (default all), float32 ``(B, Hq, len(q_blocks), n_kv)``.

        Causally invalid blocks are ``-inf`` (every row keeps its diagonal block, so it is
        never all ``-inf``); the gate's scores are ``softmax`` of these over the last axis.
        ``projected``: :meth:`project`'s result when the caller scores several chunks.
        """
        queries, keys = self.project(inputs) if projected is None else projected
        rows = query_block_range(queries.shape[2], q_blocks)
        logits = grouped_matmul(queries[:, :, rows.start : rows.stop], keys) * self.hidden_size**-0.5
        if causal:
            block = inputs.block
            valid = causal_block_rows(inputs.seq_q, inputs.seq_k, block, block, rows, logits.device)
            logits = logits.masked_fill(~valid, float("-inf"))
        return logits

    def forward(self, q: torch.Tensor, k: torch.Tensor, *, causal: bool = True) -> torch.Tensor:
        """Gate logits of every query block from post-RoPE q and k: float32 ``(B, Hq, n_q, n_kv)``."""
        return self.block_logits(self.pool(q, k), causal=causal)


def distillation_loss(logits: torch.Tensor, target: torch.Tensor, *, skip_fraction: float = 0.25) -> torch.Tensor:
    """Mean per-row ``KL(target || softmax(logits))`` over the query blocks after the first ``skip_fraction``.

    logits float ``(B, H, n_q, n_kv)`` (``-inf`` where invalid), target float32 of the same
    shape with rows summing to 1 and zeros where invalid.
    """
    start = int(logits.shape[2] * skip_fraction)
    log_probs = torch.log_softmax(logits[:, :, start:].float(), dim=-1)
    target = target[:, :, start:]
    # Blocks the target gives no mass contribute nothing (and their -inf log-probs must not give NaN).
    log_probs = log_probs.masked_fill(target <= 0, 0.0)
    return (torch.special.xlogy(target, target) - target * log_probs).sum(-1).mean()


def _layer_type(config, layer: int) -> str | None:
    layer_types = getattr(config, "layer_types", None)
    return layer_types[layer] if layer_types else None


def model_rope_frequencies(model, layer: int) -> torch.Tensor | None:
    """The RoPE frequencies ``(r/2,)`` a transformers model applies in attention layer ``layer`` (``None``: no RoPE).

    Models with per-layer-type RoPE (Gemma 3) keep one table per layer type (``<type>_inv_freq``
    on one rotary module, or a separate ``rotary_emb_local`` in older transformers).
    """
    inner = getattr(model, "model", model)
    rotary = getattr(inner, "rotary_emb", None)
    layer_type = _layer_type(model.config, layer)
    if layer_type is not None:
        per_type = getattr(rotary, f"{layer_type}_inv_freq", None)
        if per_type is not None:
            return per_type.detach().float().cpu()
        if layer_type == "sliding_attention":
            rotary = getattr(inner, "rotary_emb_local", rotary)
    inv_freq = getattr(rotary, "inv_freq", None)
    return None if inv_freq is None else inv_freq.detach().float().cpu()


def model_rope_theta(config, layer: int) -> float:
    """The RoPE base of layer ``layer`` (``rope_parameters``, per layer type where the model has types; 10000 if unset)."""
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, Mapping):
        parameters = parameters.get(_layer_type(config, layer), parameters)
        if isinstance(parameters, Mapping) and parameters.get("rope_theta"):
            return float(parameters["rope_theta"])
    return float(getattr(config, "rope_theta", None) or 10000.0)


class SeerGates:
    """The gates of a model, one :class:`AttnGate` per attention layer, with save/load.

    ``gates[layer]`` is a layer's gate; :meth:`layer_methods` gives ``sa.patch``'s
    ``layer_methods`` for the ``seer`` method. Saved as a ``torch.save`` dict (loaded with
    ``weights_only=True``); the weights are stored in ``dtype`` (bfloat16 by default, halving
    the file) and loaded as float32.
    """

    def __init__(self, gates: Mapping[int, AttnGate], *, model: str | None = None, meta: Mapping | None = None):
        if not gates:
            raise ValueError("gates must hold at least one layer's AttnGate")
        for layer, gate in gates.items():
            check_int("gates layer index", layer, minimum=0)
            if not isinstance(gate, AttnGate):
                raise TypeError(f"gates[{layer}] must be an AttnGate, got {type(gate).__name__}")
        self.gates = dict(sorted(gates.items()))
        self.model = model
        self.meta = dict(meta or {})

    @property
    def layers(self) -> list[int]:
        return list(self.gates)

    def __getitem__(self, layer: int) -> AttnGate:
        if layer not in self.gates:
            raise ValueError(f"these gates have no layer {layer}; their layers: {self.layers}")
        return self.gates[layer]

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        for gate in self.gates.values():
            yield from gate.parameters()

    def to(self, device) -> SeerGates:
        for gate in self.gates.values():
            gate.to(device)
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def for_model(
        cls,
        model,
        *,
        layers: Iterable[int] | None = None,
        block_size: int = DEFAULT_BLOCK,
        hidden_size: int | None = None,
        name: str | None = None,
        seed: int = 0,
    ) -> SeerGates:
        """Untrained gates shaped for a transformers model's ``layers`` (default: its full-attention layers)."""
        config = model.config
        q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // q_heads
        layer_types = getattr(config, "layer_types", None)
        if layers is None:
            layers = [
                i for i in range(config.num_hidden_layers) if not layer_types or layer_types[i] != "sliding_attention"
            ]
        torch.manual_seed(seed)
        gates = {
            layer: AttnGate(
                q_heads=q_heads,
                kv_heads=kv_heads,
                head_dim=head_dim,
                block_size=block_size,
                hidden_size=hidden_size,
                rope_theta=model_rope_theta(config, layer),
                model_inv_freq=model_rope_frequencies(model, layer),
            )
            for layer in layers
        }
        return cls(gates, model=name or embedded_model_name(model))

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16) -> int:
        """Write the gates to ``path``; returns the file's size in bytes."""
        layers = {}
        for layer, gate in self.gates.items():
            layers[layer] = {
                "q_proj": gate.q_proj.detach().to("cpu", dtype),
                "k_proj": gate.k_proj.detach().to("cpu", dtype),
                "model_inv_freq": None if gate.model_inv_freq is None else gate.model_inv_freq.cpu(),
            }
        first = next(iter(self.gates.values()))
        data = {
            "format": GATES_FORMAT,
            "model": self.model,
            "q_heads": first.q_heads,
            "kv_heads": first.kv_heads,
            "head_dim": first.head_dim,
            "block_size": first.block_size,
            "hidden_size": first.hidden_size,
            "rope_theta": first.rope_theta,
            "layers": layers,
            "meta": self.meta,
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)
        return path.stat().st_size

    @classmethod
    def load(cls, path: str | os.PathLike, *, device=None) -> SeerGates:
        """Read gates written by :meth:`save` (float32, on ``device``, default CPU)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"gates file not found: {str(path)!r}")
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or data.get("format") != GATES_FORMAT:
            raise ValueError(f"{str(path)!r} is not a SeerAttention gates file (expected format {GATES_FORMAT!r})")
        gates = {}
        for layer, weights in data["layers"].items():
            gate = AttnGate(
                q_heads=data["q_heads"],
                kv_heads=data["kv_heads"],
                head_dim=data["head_dim"],
                block_size=data["block_size"],
                hidden_size=data["hidden_size"],
                rope_theta=data["rope_theta"],
                model_inv_freq=weights["model_inv_freq"],
            )
            with torch.no_grad():
                gate.q_proj.copy_(weights["q_proj"].float())
                gate.k_proj.copy_(weights["k_proj"].float())
            gates[int(layer)] = gate.requires_grad_(False)
        result = cls(gates, model=data.get("model"), meta=data.get("meta"))
        return result.to(device) if device is not None else result


def embedded_model_name(model) -> str | None:
    """The embedded model name (``sparse_attn.models``) a loaded model came from, or ``None``.

    ``sparse_attn.models.load`` loads embedded models from a cache directory named after them.
    """
    from ..models import EMBEDDED_MODELS  # models imports nothing optional at import time

    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    name = Path(source).name
    return name if name in EMBEDDED_MODELS else None


@torch.no_grad()
def distillation_targets(
    model, input_ids: torch.Tensor, gates: SeerGates, *, backend: str = "auto", pooled_map: Callable | None = None
) -> dict[int, tuple[GateInputs, torch.Tensor]]:
    """Per gated layer, the gate's inputs and the training target from one forward pass of the frozen model.

    ``input_ids`` int64 ``(B, S)`` without padding. The model is patched with the ``dense``
    method (exact attention on the sparse-attn engine, ``backend``) for the pass, so that
    ``sa.record(capture=True)`` sees each layer's post-RoPE q and k, then restored. Returns
    ``{layer: (gate inputs, target float32 (B, Hq, n_q, n_kv))}``; the captured q/k are
    dropped layer by layer. ``pooled_map`` computes the target (default
    :func:`sparse_attn.ops.pooled_attention_map.pooled_attention_map`, kernel or reference by
    the dispatch rule; its reference can be forced by passing it).
    """
    from ..integrations import patch, record, unpatch
    from ..integrations.patching import _attention_modules
    from ..integrations.records import WHOLE_BATCH

    if getattr(model, "_sparse_attn_state", None) is not None:
        raise ValueError("model is already patched: distillation_targets needs an unpatched model")
    modules = _attention_modules(model)
    patch(model, method="dense", min_seq_len=1, backend=backend)
    try:
        with record(model, capture=True) as recorder:
            model(input_ids=input_ids)
    finally:
        unpatch(model)
    result = {}
    for layer in gates.layers:
        captured = recorder.tensors.pop((layer, WHOLE_BATCH), None)
        if captured is None:
            raise ValueError(f"layer {layer} recorded no q/k (a sliding-window layer, or not an attention layer)")
        q, k, _ = captured
        gate = gates[layer]
        scale = float(getattr(modules[layer], "scaling", q.shape[-1] ** -0.5))
        target = (pooled_map or pooled_attention_map)(
            q, k, block_q=gate.block_size, block_k=gate.block_size, scale=scale
        )
        result[layer] = (gate.pool(q, k), target)
        del q, k, captured
    return result


def _learning_rate(step: int, *, steps: int, base: float, warmup: int) -> float:
    """Linear warm-up to ``base``, then cosine decay to 0 at ``steps`` (the released script's schedule)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def distill(
    gates: SeerGates,
    data: Mapping[int, tuple[GateInputs, torch.Tensor]],
    *,
    steps: int,
    lr: float = 1e-3,
    warmup: int = 20,
    batch_size: int = 1,
    seed: int = 0,
    skip_fraction: float = 0.25,
    callback: Callable[[int], None] | None = None,
    callback_every: int = 50,
) -> list[float]:
    """Train ``gates`` on ``data`` (``{layer: (inputs, targets)}`` with a batch of sequences each); returns the losses.

    Each step draws ``batch_size`` of the sequences (a seeded generator), averages
    :func:`distillation_loss` over them and over the layers, and takes an AdamW step
    (``lr``, ``warmup`` warm-up steps then cosine decay, no weight decay). ``callback(step)``
    runs after every ``callback_every`` steps and after the last (e.g. a validation loss).
    """
    check_int("steps", steps)
    check_int("batch_size", batch_size)
    check_int("warmup", warmup)
    sequences = next(iter(data.values()))[0].q.shape[0]
    if any(inputs.q.shape[0] != sequences for inputs, _ in data.values()):
        raise ValueError("every layer of data must hold the same sequences")
    params = [p.requires_grad_(True) for layer in data for p in gates[layer].parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = params[0].device
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        rows = torch.randperm(sequences, generator=generator)[: min(batch_size, sequences)].to(device)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, steps=steps, base=lr, warmup=warmup)
        loss = sum(
            distillation_loss(gates[layer].block_logits(inputs.select(rows)), target[rows], skip_fraction=skip_fraction)
            for layer, (inputs, target) in data.items()
        ) / len(data)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"distillation loss is {losses[-1]} at step {step}")
        if callback is not None and ((step + 1) % callback_every == 0 or step + 1 == steps):
            callback(step + 1)
    for p in params:
        p.requires_grad_(False)
    return losses


@torch.no_grad()
def mean_distillation_loss(gates: SeerGates, data: Mapping[int, tuple[GateInputs, torch.Tensor]], **options) -> float:
    """:func:`distillation_loss` over all sequences of ``data``, averaged over its layers."""
    total = sum(float(distillation_loss(gates[layer].block_logits(i), t, **options)) for layer, (i, t) in data.items())
    return total / len(data)


def stack_targets(
    parts: Sequence[Mapping[int, tuple[GateInputs, torch.Tensor]]],
) -> dict[int, tuple[GateInputs, torch.Tensor]]:
    """:func:`distillation_targets` of several passes (same length) stacked along the batch."""
    return {
        layer: (GateInputs.concat([p[layer][0] for p in parts]), torch.cat([p[layer][1] for p in parts]))
        for layer in parts[0]
    }
