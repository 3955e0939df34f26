"""Auto: per head, the sparsest candidate pattern whose recall on the last-query probe meets a budget.

Not from a paper: an error-budgeted selector over the registered training-free prefill methods
(issue 18). Every other method is tuned by a threshold whose accuracy depends on the model,
the layer, the head and the input; ``auto`` takes the accuracy itself as its option.

Rule (per batch row and query head):

1. Probe: the exact softmax of the last ``probe_queries`` queries of the last query block
   against every key, summed per KV block (:mod:`sparse_attn.ops.last_query_probe`).
2. Candidates: every candidate ``(method, options)`` estimates its pattern on the whole input.
   A candidate's probe recall for a head is the probe mass inside the KV blocks its last query
   block keeps, over the probe's total; its cost is its density for that head (computed blocks
   over causally valid blocks).
3. Choice: among the candidates whose probe recall reaches ``recall``, the one with the lowest
   density (ties: the earlier candidate). A head that no candidate serves gets the dense
   pattern (all causally valid blocks): the budget is then met exactly, at full cost, and
   :class:`AutoChoice` marks that head with ``DENSE``.

Defaults: ``recall=0.95`` of the softmax mass; ``candidates=None`` takes
:data:`DEFAULT_CANDIDATES` (the registered training-free prefill estimators, a few settings
each); ``probe_queries=64`` (MInference's last-query count). Choices and limits:

- The probe sees the last rows only. Recall there is a proxy for the whole head: for static
  and block-scored patterns the last rows see the longest context and usually keep the
  smallest share of it (a conservative proxy), but methods that estimate from the last
  queries themselves (``vertical_slash``, ``flexprefill``) are judged on the rows they fit.
  ``tri_shape`` is not a default candidate for that reason: it keeps its last rows dense, so
  the probe would always credit it with full recall. ``sale`` is not a default candidate for
  its cost: its low-bit scoring is emulated here in float32 over every query-key pair, which
  at long context costs more than dense attention (add it to ``candidates`` to compare).
- Candidates must use the call's blocks (``block_q``/``block_k``): ``moba`` (token-level,
  ``block_q = 1``) and the spatial methods are not candidates. A candidate that cannot run the
  case (e.g. ``xattention`` with blocks that are not a multiple of its stride) is skipped
  with one warning naming why.
- Cost: every candidate estimates on every call, so the estimate costs the sum of theirs plus
  the probe. :class:`AutoState` (``state=`` option) caches the choice across calls (per layer:
  one state per layer, e.g. through :func:`auto_layer_methods`) and only re-selects every
  ``refresh_every`` calls; in between only the chosen candidates estimate.
- Patterns are per query head (``kv_counts`` ``(B, Hq, n_q_blocks)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..checks import check_fraction, check_int
from ..geometry import causal_block_mask, num_blocks
from ..ops.last_query_probe import probe_last_queries
from ..pattern import BlockSparsePattern, dense_pattern
from ..registry import HEAD_METHODS, get_method, register_method

__all__ = ["DENSE", "DEFAULT_CANDIDATES", "AutoChoice", "AutoConfig", "AutoState", "auto_layer_methods", "choose"]

# The candidate index of a head that no candidate served: it runs dense.
DENSE = -1

DEFAULT_CANDIDATES: tuple[tuple[str, dict], ...] = (
    ("streaming", {"sink_tokens": 128, "local_tokens": 1024}),
    ("streaming", {}),
    ("power", {}),
    ("block_topk", {"top_k": 16}),
    ("block_topk", {"top_k": 64}),
    ("vertical_slash", {}),
    ("xattention", {"threshold": 0.8}),
    ("xattention", {"threshold": 0.9}),
    ("xattention", {"threshold": 0.95}),
    ("flexprefill", {"gamma": 0.9}),
    ("flexprefill", {"gamma": 0.95}),
    ("proxyattn", {}),
    ("anchor", {}),
    ("hip", {}),
)


def _normalized(candidates) -> tuple[tuple[str, dict], ...]:
    """Candidates as ``((name, options), ...)``, each checked against its method's config."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
        raise TypeError(f"candidates must be a sequence of method names or (name, options) pairs, got {candidates!r}")
    normalized = []
    for entry in candidates:
        if isinstance(entry, str):
            name, options = entry, {}
        elif (
            isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], Mapping)
        ):
            name, options = entry[0], dict(entry[1])
        else:
            raise TypeError(f"candidates entries must be a method name or (name, options), got {entry!r}")
        if name == "auto":
            raise ValueError("candidates cannot include 'auto' itself")
        get_method(name).make_config(**options)
        normalized.append((name, options))
    if not normalized:
        raise ValueError("candidates must name at least one method")
    return tuple(normalized)


def label(name: str, options: Mapping) -> str:
    """A candidate's display name, e.g. ``xattention(threshold=0.9)``."""
    settings = ", ".join(f"{key}={value}" for key, value in sorted(options.items()))
    return f"{name}({settings})"


@dataclass(frozen=True)
class AutoChoice:
    """What :func:`choose` picked: per (batch, query head), the candidate index (``DENSE`` = -1: dense),
    its probe recall (at the last refresh) and its density on this call (float32 ``(B, Hq)``), the
    candidates' labels, and whether this call re-selected (``refreshed``) or reused a cached choice."""

    labels: tuple[str, ...]
    index: torch.Tensor
    recall: torch.Tensor
    density: torch.Tensor
    refreshed: bool

    def names(self, batch: int = 0) -> list[str]:
        """The chosen candidate's label for each query head of batch row ``batch``."""
        return ["dense" if int(i) == DENSE else self.labels[int(i)] for i in self.index[batch]]


@dataclass(eq=False)
class AutoState:
    """The choice of one layer kept across calls: re-selected every ``refresh_every`` calls.

    Between refreshes only the chosen candidates estimate (the probe and the others are
    skipped). A call whose batch size or head count differs from the cached choice re-selects.
    ``last`` is the :class:`AutoChoice` of the latest call (for reporting: methods and
    densities per head).
    """

    refresh_every: int = 16
    calls: int = 0
    last: AutoChoice | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("refresh_every", self.refresh_every, minimum=1)

    def cached(self, batch: int, heads: int) -> AutoChoice | None:
        """The choice to reuse on this call, or None when it must be re-selected."""
        if self.last is None or self.calls % self.refresh_every == 0:
            return None
        return self.last if tuple(self.last.index.shape) == (batch, heads) else None


@dataclass(frozen=True)
class AutoConfig:
    recall: float = 0.95
    candidates: tuple | None = None
    probe_queries: int = 64
    state: AutoState | None = None

    def __post_init__(self) -> None:
        check_fraction("recall", self.recall)
        check_int("probe_queries", self.probe_queries, minimum=1)
        candidates = DEFAULT_CANDIDATES if self.candidates is None else self.candidates
        object.__setattr__(self, "candidates", _normalized(candidates))
        if self.state is not None and not isinstance(self.state, AutoState):
            raise TypeError(f"state must be an AutoState or None, got {type(self.state).__name__}")


def _probe_recall(pattern: BlockSparsePattern, probe_blocks: torch.Tensor) -> torch.Tensor:
    """Probe mass kept by each head's last query block over the probe's total: float32 ``(B, Hq)``."""
    counts, indices = pattern.kv_counts[:, :, -1], pattern.kv_indices[:, :, -1].long()
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = torch.zeros(*indices.shape[:2], probe_blocks.shape[-1] + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, torch.where(used, indices, probe_blocks.shape[-1]), True)
    mass = (probe_blocks * kept[..., :-1]).sum(-1)
    return mass / probe_blocks.sum(-1).clamp_min(1e-30)


class _Assembly:
    """The per-head result, built candidate by candidate: rows of a head are overwritten when a
    better candidate comes, so only the result and one candidate pattern are held at a time."""

    def __init__(self, batch: int, heads: int, n_q: int, device) -> None:
        self.counts = torch.zeros((batch, heads, n_q), dtype=torch.int32, device=device)
        self.indices = torch.zeros((batch, heads, n_q, 1), dtype=torch.int32, device=device)

    def write(self, pattern: BlockSparsePattern, heads: torch.Tensor) -> None:
        """Copy ``pattern``'s rows (expanded to this batch and head count) into the heads where ``heads`` is True."""
        shape = tuple(self.counts.shape)
        pattern = pattern.expand_heads(shape[1])
        width = pattern.max_kv
        if width > self.indices.shape[-1]:
            wider = torch.zeros((*shape, width), dtype=torch.int32, device=self.indices.device)
            wider[..., : self.indices.shape[-1]] = self.indices
            self.indices = wider
        self.counts[heads] = pattern.kv_counts.expand(shape)[heads]
        rows = torch.zeros((int(heads.sum()), shape[2], self.indices.shape[-1]), dtype=torch.int32, device=heads.device)
        rows[..., :width] = pattern.kv_indices.expand(*shape, width)[heads]
        self.indices[heads] = rows

    def finish(self, geometry: dict, causal: bool) -> BlockSparsePattern:
        width = max(1, int(self.counts.max()))
        pattern = BlockSparsePattern(
            kv_counts=self.counts, kv_indices=self.indices[..., :width].contiguous(), **geometry
        )
        # Every row is a row of a valid pattern of the same geometry, so the result is valid.
        pattern._cache[("validated", causal)] = True
        return pattern


def _candidate_pattern(name: str, options: dict, q, k, *, causal: bool, geometry: dict) -> BlockSparsePattern | None:
    """The candidate's pattern, or None (with a warning) when it cannot run this case."""
    spec = get_method(name)
    try:
        pattern = spec.estimate(
            q, k, spec.make_config(**options), causal=causal, block_q=geometry["block_q"], block_k=geometry["block_k"]
        )
    except ValueError as error:
        warnings.warn(f"auto: candidate {label(name, options)} skipped: {error}", stacklevel=4)
        return None
    found = {key: getattr(pattern, key) for key in geometry}
    if found != geometry:
        raise ValueError(
            f"auto: candidate {label(name, options)} returns patterns of geometry {found}, not the call's {geometry}; "
            "candidates must use the call's block_q and block_k"
        )
    return pattern


def _head_density(pattern: BlockSparsePattern, valid: int) -> torch.Tensor:
    return pattern.kv_counts.sum(-1, dtype=torch.int64).float() / valid


def choose(
    q: torch.Tensor, k: torch.Tensor, config: AutoConfig, *, causal: bool, block_q: int, block_k: int
) -> tuple[BlockSparsePattern, AutoChoice]:
    """The per-head pattern and what was chosen (see the module docstring).

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``. Uses and updates ``config.state`` when set.
    """
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    geometry = dict(block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k)
    n_q = num_blocks(seq_q, block_q)
    valid = int(causal_block_mask(seq_q, seq_k, block_q, block_k).sum()) if causal else n_q * num_blocks(seq_k, block_k)
    labels = tuple(label(name, options) for name, options in config.candidates)
    assembly = _Assembly(batch, q_heads, n_q, q.device)
    state = config.state
    cached = state.cached(batch, q_heads) if state is not None else None
    if cached is not None:
        index, recall, density = cached.index, cached.recall, cached.density.clone()
        for position in index.unique().tolist():
            heads = index == position
            if position == DENSE:
                continue
            pattern = _candidate_pattern(*config.candidates[position], q, k, causal=causal, geometry=geometry)
            if pattern is None:  # cannot run this call's case: those heads run dense until the next refresh
                index = torch.where(heads, DENSE, index)
                continue
            assembly.write(pattern, heads)
            density[heads] = _head_density(pattern, valid).expand(batch, q_heads)[heads]
    else:
        last_rows = seq_q - (n_q - 1) * block_q
        probe = probe_last_queries(
            q,
            k,
            num_queries=min(config.probe_queries, last_rows),
            block_k=block_k,
            scale=q.shape[-1] ** -0.5,
            causal=causal,
        )
        index = torch.full((batch, q_heads), DENSE, dtype=torch.int64, device=q.device)
        recall = torch.ones((batch, q_heads), device=q.device)
        density = torch.ones((batch, q_heads), device=q.device)
        for position, (name, options) in enumerate(config.candidates):
            pattern = _candidate_pattern(name, options, q, k, causal=causal, geometry=geometry)
            if pattern is None:
                continue
            expanded = pattern.expand_heads(q_heads)
            candidate_recall = _probe_recall(expanded, probe.block).expand(batch, q_heads)
            candidate_density = _head_density(expanded, valid).expand(batch, q_heads)
            meets = candidate_recall >= config.recall
            better = meets & ((index == DENSE) | (candidate_density < density))
            if bool(better.any()):
                assembly.write(pattern, better)
                index = torch.where(better, position, index)
                recall = torch.where(better, candidate_recall, recall)
                density = torch.where(better, candidate_density, density)
            del pattern, expanded
    fallback = index == DENSE
    if bool(fallback.any()):
        assembly.write(dense_pattern(**geometry, causal=causal, device=q.device), fallback)
        recall = torch.where(fallback, 1.0, recall)
        density = torch.where(fallback, 1.0, density)
    choice = AutoChoice(labels=labels, index=index, recall=recall, density=density, refreshed=cached is None)
    if state is not None:
        state.calls += 1
        state.last = choice
    return assembly.finish(geometry, causal), choice


@register_method(
    "auto",
    config=AutoConfig,
    paper="none (this project, issue 18): error-budgeted choice among the registered estimators",
    summary="per head, the sparsest candidate pattern whose last-query-probe recall reaches `recall`; dense if none",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: AutoConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Lists per query head: ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``; see :func:`choose`."""
    pattern, choice = choose(q, k, config, causal=causal, block_q=block_q, block_k=block_k)
    pattern.store_plan(HEAD_METHODS, tuple(tuple(choice.names(b)) for b in range(choice.index.shape[0])))
    return pattern


def auto_layer_methods(layers: Iterable[int], *, refresh_every: int = 16, **options) -> dict[int, tuple[str, dict]]:
    """``layer_methods`` for :func:`sparse_attn.patch`: ``auto`` on each layer with a state of its own.

    ``sa.patch(model, layer_methods=auto_layer_methods(range(n_layers), recall=0.95))`` caches
    each layer's choice per head and re-selects it every ``refresh_every`` calls;
    ``plan.options["state"].last`` of a layer holds its latest :class:`AutoChoice`.
    """
    check_int("refresh_every", refresh_every, minimum=1)
    return {layer: ("auto", {**options, "state": AutoState(refresh_every=refresh_every)}) for layer in layers}
