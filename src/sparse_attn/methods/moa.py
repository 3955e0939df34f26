"""MoA: per-head elastic sliding windows whose spans grow with the input length, from an offline profile.

Paper: Tianyu Fu, Haofeng Huang, Xuefei Ning, Genghan Zhang, Boju Chen, Tianqi Wu, Hongyi Wang,
Zixiao Huang, Shiyao Li, Shengen Yan, Guohao Dai, Huazhong Yang, Yu Wang, "MoA: Mixture of
Sparse Attention for Automatic Large Language Model Compression", 2024, arXiv:2406.14909.

Rule (per query head ``h``): the head attends to the first ``sink_tokens`` keys (attention
sinks) and to a sliding window of ``span_h(N) = alpha_h + beta_h * N`` keys ending at each
query, ``N`` being the input length (here ``Sk``). The elastic rules ``(alpha_h, beta_h)``
differ per head and layer: some heads keep a fixed local span, others widen with the input.
MoA chooses them offline: it profiles each head's sensitivity on calibration text at a few
lengths and picks, under a density budget per length, the rules that lose the least accuracy.

Here: the ``moa`` method applies given rules (``spans``, or ``profile`` + ``layer`` from a
:class:`MoAProfile` JSON file); :func:`calibrate` builds such a profile from a model's
post-RoPE q/k (``sa.record(model, capture=True)``, CPU-runnable on the embedded tiny models),
and :meth:`MoAProfile.layer_methods` turns it into ``sa.patch(..., layer_methods=...)``.

Defaults: without a profile every head uses the same rule ``alpha=1024`` tokens,
``beta=0.25``. This uniform default is OUR choice (a StreamingLLM-like window that grows with
the input), not a profile: MoA's point is that the rules differ per head, which only a
profile of the model provides. ``sink_tokens=64`` (MoA keeps one global block of 64 tokens).
Choices where the paper differs or is silent:

- Sensitivity: MoA weighs each attention value by its gradient on the calibration loss
  (a first-order Taylor estimate of the loss change when masked). :func:`calibrate` has no
  gradients (it sees captured q/k only) and uses the attention mass a rule drops instead
  (``1 - recall`` per head and length), summed over the profiled lengths.
- Optimisation: MoA solves a mixed-integer program over its candidate grid. :func:`calibrate`
  uses a Lagrangian relaxation: each head picks the rule minimising ``loss + lambda *
  density``, with the smallest ``lambda`` (found by bisection) whose average density meets
  ``density_budget`` at every profiled length. This is exact for a single length and a
  close, monotone approximation for several.
- Granularity: spans are in tokens; the pattern keeps the blocks (``block_q`` x ``block_k``)
  that hold the window, i.e. ``ceil(span / block_k)`` KV blocks up to the query block's own
  (a superset of the token window, at block cost). Calibration uses the same block rule at
  its own ``block`` size (64, MoA's).
- Prefixes of one captured prompt serve as the shorter profiling inputs (a causal prefix is
  a valid shorter input), so one capture per layer profiles every length.
- ``causal=False`` (not in the paper): the window is symmetric.

Operators: :mod:`sparse_attn.ops.static_masks` (block distances), streamed by
:func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checks import check_fraction, check_int, is_finite_number
from ..geometry import causal_block_mask, num_blocks
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops.gqa import grouped_matmul
from ..ops.last_query_probe import block_sum
from ..ops.static_masks import block_distance
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method

__all__ = ["MoAProfile", "MoaConfig", "calibrate"]

PROFILE_FORMAT = "sparse_attn.moa/1"


def _check_rule(name: str, rule) -> tuple[float, float]:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
        raise TypeError(f"{name} entries must be (alpha, beta) pairs, got {rule!r}")
    alpha, beta = rule
    for part, value in (("alpha", alpha), ("beta", beta)):
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"{name}: {part} must be a finite number >= 0, got {value!r}")
    return float(alpha), float(beta)


@dataclass(frozen=True)
class MoAProfile:
    """Per layer, per query head, the elastic rule ``(alpha, beta)``: span = ``alpha + beta * N`` tokens.

    JSON (:meth:`save` / :meth:`load`): ``{"format": "sparse_attn.moa/1", "sink_tokens": 64,
    "block": 64, "lengths": [...], "density_budget": 0.5, "layers": {"<layer>": [[alpha, beta],
    ...]}}``; ``lengths`` and ``density_budget`` record how it was calibrated.
    """

    layers: dict[int, tuple[tuple[float, float], ...]]
    sink_tokens: int = 64
    block: int = 64
    lengths: tuple[int, ...] = ()
    density_budget: float | None = None

    def spans(self, layer: int) -> tuple[tuple[float, float], ...]:
        if layer not in self.layers:
            raise ValueError(f"the MoA profile has no layer {layer}; its layers: {sorted(self.layers)}")
        return self.layers[layer]

    def layer_methods(self) -> dict[int, tuple[str, dict]]:
        """``sa.patch(model, method=..., layer_methods=profile.layer_methods())``: ``moa`` on the profiled layers."""
        return {
            layer: ("moa", {"spans": spans, "sink_tokens": self.sink_tokens}) for layer, spans in self.layers.items()
        }

    def save(self, path: str | Path) -> None:
        data = {
            "format": PROFILE_FORMAT,
            "sink_tokens": self.sink_tokens,
            "block": self.block,
            "lengths": list(self.lengths),
            "density_budget": self.density_budget,
            "layers": {str(layer): [list(rule) for rule in spans] for layer, spans in sorted(self.layers.items())},
        }
        Path(path).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> MoAProfile:
        where = f"profile {str(path)!r}"
        if not Path(path).is_file():
            raise ValueError(f"{where} is not a file")
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not JSON: {error}") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{where} is not a MoA profile (expected format {PROFILE_FORMAT!r})")
        missing = sorted({"layers", "sink_tokens", "block"} - set(data))
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        if not isinstance(data["layers"], dict) or not data["layers"]:
            raise ValueError(f"{where}: layers must map layer indices to per-head rules, got {data['layers']!r}")
        if any(not str(layer).isdigit() for layer in data["layers"]):
            raise ValueError(f"{where}: layer keys must be non-negative integers, got {sorted(data['layers'])}")
        check_int(f"{where}: sink_tokens", data["sink_tokens"], minimum=0)
        check_int(f"{where}: block", data["block"])
        lengths = data.get("lengths", [])
        if not isinstance(lengths, list):
            raise ValueError(f"{where}: lengths must be a list of token counts, got {lengths!r}")
        for n in lengths:
            check_int(f"{where}: lengths", n)
        layers = {}
        for layer, spans in data["layers"].items():
            if not isinstance(spans, list) or not spans:
                raise ValueError(f"{where}: layer {layer} must list one (alpha, beta) rule per head, got {spans!r}")
            layers[int(layer)] = tuple(_check_rule("profile", rule) for rule in spans)
        return cls(
            layers=layers,
            sink_tokens=data["sink_tokens"],
            block=data["block"],
            lengths=tuple(lengths),
            density_budget=data.get("density_budget"),
        )


@dataclass(frozen=True)
class MoaConfig:
    alpha: float = 1024.0
    beta: float = 0.25
    spans: tuple | None = None
    profile: str | None = None
    layer: int | None = None
    sink_tokens: int = 64

    def __post_init__(self) -> None:
        _check_rule("alpha/beta", (self.alpha, self.beta))
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        if self.spans is not None:
            if isinstance(self.spans, (str, bytes)) or not isinstance(self.spans, Sequence) or not self.spans:
                raise TypeError(f"spans must be a non-empty sequence of (alpha, beta) pairs, got {self.spans!r}")
            object.__setattr__(self, "spans", tuple(_check_rule("spans", rule) for rule in self.spans))
        if self.profile is not None:
            if not isinstance(self.profile, (str, Path)):
                raise TypeError(f"profile must be a path (str) or None, got {type(self.profile).__name__}")
            if self.spans is not None:
                raise ValueError("give spans or profile, not both")
            check_int("layer", self.layer, minimum=0)
        elif self.layer is not None:
            raise ValueError("layer selects a layer of a profile; it needs profile=")

    def rules(self, q_heads: int) -> tuple[tuple[float, float], ...]:
        """One ``(alpha, beta)`` per query head."""
        if self.profile is not None:
            rules = MoAProfile.load(self.profile).spans(self.layer)
        elif self.spans is not None:
            rules = self.spans
        else:
            return ((self.alpha, self.beta),) * q_heads
        if len(rules) != q_heads:
            raise ValueError(f"spans/profile give {len(rules)} heads' rules but q has {q_heads} query heads")
        return rules


def window_blocks(rules: Sequence[tuple[float, float]], length: int, block_k: int) -> torch.Tensor:
    """Int64 ``(H,)``: KV blocks of each head's window at input length ``length`` (own block included).

    ``ceil(span / block_k)`` with ``span = alpha + beta * length`` clamped to ``[1, length]``.
    """
    spans = [min(max(alpha + beta * length, 1.0), float(length)) for alpha, beta in rules]
    return torch.tensor([math.ceil(span / block_k) for span in spans], dtype=torch.int64)


@register_method(
    "moa",
    config=MoaConfig,
    paper="Fu et al. 2024, MoA: Mixture of Sparse Attention for Automatic LLM Compression (arXiv:2406.14909)",
    summary="static per head: sinks + a sliding window of alpha + beta * length tokens (rules from a profile)",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: MoaConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Lists per query head, shared by the batch: ``kv_counts`` int32 ``(1, Hq, n_q_blocks)``."""
    q_heads, seq_q, seq_k = q.shape[1], q.shape[2], k.shape[2]
    local = window_blocks(config.rules(q_heads), seq_k, block_k).to(q.device)[:, None, None]
    sink_blocks = num_blocks(config.sink_tokens, block_k)

    def mask_rows(q_blocks: range) -> torch.Tensor:
        distance = block_distance(seq_q, seq_k, block_q, block_k, q.device, q_blocks=q_blocks)
        kv_block = torch.arange(distance.shape[1], device=q.device)
        return ((distance[None] < local) | (kv_block < sink_blocks)[None, None, :])[None]

    return stream_pattern(
        mask_rows,
        batch=1,
        heads=q_heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
        row_elements=3 * q_heads * num_blocks(seq_k, block_k),
    )


def block_attention_mass(q: torch.Tensor, k: torch.Tensor, block: int) -> torch.Tensor:
    """Exact causal attention mass per (query block, KV block), summed over the batch: float32 ``(Hq, n, n)``.

    q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)`` (the same length). Each query's softmax sums to 1,
    so row ``i`` sums to the number of queries in block ``i``. Computed a chunk of whole query
    blocks at a time (the chunk's logits stay within half of ``CHUNK_ELEMENTS``).
    """
    batch, q_heads, length, _ = q.shape
    if k.shape[2] != length:
        raise ValueError(f"calibration needs q and k of one length (a whole prompt), got {length} and {k.shape[2]}")
    n = num_blocks(length, block)
    scale = q.shape[-1] ** -0.5
    mass = torch.zeros((q_heads, n, n), dtype=torch.float32, device=q.device)
    blocks_per_chunk = max(1, CHUNK_ELEMENTS // (2 * batch * q_heads * block * length))
    for first in range(0, n, blocks_per_chunk):
        start, end = first * block, min(length, (first + blocks_per_chunk) * block)
        logits = grouped_matmul(q[:, :, start:end].float() * scale, k[:, :, :end].float())
        positions = torch.arange(start, end, device=q.device)
        logits.masked_fill_(torch.arange(end, device=q.device)[None, :] > positions[:, None], float("-inf"))
        per_key_block = block_sum(torch.softmax(logits, dim=-1), block)
        del logits
        rows = per_key_block.shape[2]
        padded = torch.nn.functional.pad(per_key_block, (0, n - per_key_block.shape[-1], 0, -rows % block))
        mass[:, first : first + -(-rows // block)] = padded.view(batch, q_heads, -1, block, n).sum(dim=(0, 3))
    return mass


def _rule_grid(alphas: Sequence[float], betas: Sequence[float]) -> list[tuple[float, float]]:
    return [(float(alpha), float(beta)) for alpha in alphas for beta in betas]


def calibrate(
    captures: Mapping[int, Sequence[torch.Tensor]],
    *,
    density_budget: float = 0.5,
    lengths: Sequence[int] | None = None,
    alphas: Sequence[float] = (0, 128, 256, 512, 1024, 2048, 4096),
    betas: Sequence[float] = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0),
    sink_tokens: int = 64,
    block: int = 64,
) -> MoAProfile:
    """A :class:`MoAProfile` from captured attention inputs: per layer and head, the rule that drops the least mass.

    ``captures`` maps a layer to its post-RoPE ``(q, k)`` (or ``(q, k, v)``: e.g.
    ``{layer: rec.tensors[(layer, row)] for (layer, row) in rec.tensors}`` after
    ``sa.record(model, capture=True)``), q ``(B, Hq, S, D)`` and k ``(B, Hkv, S, D)`` of one
    prompt. ``lengths`` (default: ``S/2`` in whole blocks and ``S``) are the profiled input
    lengths, taken as prefixes. Per head and candidate rule (every ``alpha`` x ``beta``), the
    loss is the attention mass outside its sinks and window summed over ``lengths``; the rules
    are then chosen per head to minimise ``loss + lambda * density`` with the smallest
    ``lambda`` whose mean density over all heads of all layers is at most ``density_budget``
    at every length (see the module docstring). Raises ``ValueError`` when even the
    narrowest rules exceed the budget.
    """
    check_fraction("density_budget", density_budget)
    check_int("sink_tokens", sink_tokens, minimum=0)
    check_int("block", block)
    if not captures:
        raise ValueError("captures must hold at least one layer's (q, k)")
    grid = _rule_grid(alphas, betas)
    for rule in grid:
        _check_rule("alphas/betas", rule)
    masses = {layer: block_attention_mass(tensors[0], tensors[1], block) for layer, tensors in captures.items()}
    full = min(mass.shape[-1] for mass in masses.values()) * block
    if lengths is None:
        lengths = sorted({max(block, (full // 2) // block * block), full})
    lengths = [min(int(n), full) for n in lengths]
    sink_blocks = num_blocks(sink_tokens, block)
    # Per rule and length: its block mask (the same for every head) and density.
    losses, densities = {layer: [] for layer in masses}, []
    for rule in grid:
        per_length = []
        loss = {layer: 0.0 for layer in masses}
        for length in lengths:
            n = num_blocks(length, block)
            causal = causal_block_mask(length, length, block, block)
            distance = torch.arange(n)[:, None] - torch.arange(n)[None, :]
            local = int(window_blocks([rule], length, block)[0])
            kept = causal & ((distance < local) | (torch.arange(n) < sink_blocks)[None, :])
            per_length.append(float(kept.sum()) / float(causal.sum()))
            for layer, mass in masses.items():
                window = mass[:, :n, :n]
                recall = (window * kept).sum(dim=(1, 2)) / window.sum(dim=(1, 2))
                loss[layer] = loss[layer] + (1.0 - recall)
        densities.append(per_length)
        for layer in masses:
            losses[layer].append(loss[layer])
    density = torch.tensor(densities)  # (rules, lengths)
    loss_tables = {layer: torch.stack(table, dim=1) for layer, table in losses.items()}  # (heads, rules)

    def pick(weight: float) -> dict[int, torch.Tensor]:
        cost = density.sum(-1)[None, :] * weight
        return {layer: (table + cost).argmin(-1) for layer, table in loss_tables.items()}

    def mean_density(choice: dict[int, torch.Tensor]) -> torch.Tensor:
        chosen = torch.cat([density[index] for index in choice.values()])
        return chosen.mean(0)

    def fits(choice: dict[int, torch.Tensor]) -> bool:
        return bool((mean_density(choice) <= density_budget + 1e-9).all())

    if not fits(pick(0.0)):
        high = 1.0
        while not fits(pick(high)):
            high *= 4.0
            if high > 1e12:
                raise ValueError(
                    f"density_budget {density_budget} is below the narrowest rules' density "
                    f"{density.min(0).values.tolist()} at lengths {lengths}"
                )
        low = 0.0
        for _ in range(60):
            middle = 0.5 * (low + high)
            low, high = (low, middle) if fits(pick(middle)) else (middle, high)
        choice = pick(high)
    else:
        choice = pick(0.0)
    layers = {layer: tuple(grid[int(i)] for i in index) for layer, index in choice.items()}
    return MoAProfile(
        layers=layers, sink_tokens=sink_tokens, block=block, lengths=tuple(lengths), density_budget=density_budget
    )
