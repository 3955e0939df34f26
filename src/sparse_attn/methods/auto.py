"""Auto: per head, the sparsest candidate pattern whose recall on a probe of exact attention rows meets a budget.

Not from a paper: an error-budgeted selector over the registered training-free prefill methods
(issue 18). Every other method is tuned by a threshold whose accuracy depends on the model,
the layer, the head and the input; ``auto`` takes the accuracy itself as its option.

Rule (per batch row and query head):

1. Probe (:func:`probe_block_mass`): for each probed query block, the exact softmax of some of
   its queries against every key they see, summed over those queries per KV block.

   - ``probe="last"``: the last ``probe_queries`` (default 64, MInference's last-query count)
     queries of the last query block.
   - ``probe="spread"``: ``probe_chunks`` (default 16) query blocks evenly spaced over the
     sequence (block ``round(i * (n_q - 1) / (probe_chunks - 1))``, the first and the last
     included; every block when there are fewer), the last ``probe_queries`` (default: all,
     ``block_q``) queries of each.
2. Candidates: each candidate ``(method, options)`` gives its rows for the probed query blocks.
   A candidate's recall on a probed block (a "chunk") is the probe mass inside the KV blocks
   that it keeps for that query block, over the chunk's total mass. Its cost for a head:
   ``density="probe"`` (default), the kept blocks of its probed rows over their causally valid
   blocks; ``density="exact"``, its density over the whole head (computed blocks over causally
   valid blocks). With ``"probe"`` a candidate whose estimator streams its rows
   (:func:`~sparse_attn.ops.to_pattern.capture_rows`: every registered causal method but
   ``moba`` and ``random``) computes the probed rows only where it would work in several
   chunks of query blocks (long inputs); where its whole pattern is one chunk it returns that
   pattern and is judged as with ``"exact"`` (one call is then cheaper than one per probed
   block), and so do the static rules (``streaming``, ``power``, ``tri_shape``: their rows
   come from the geometry alone, so the whole pattern costs less than the launches of a call
   per probed block; since 2026-12-03). A candidate judged on its probed rows estimates its whole pattern afterwards only
   if some head chose it, and for a head-local method
   (:attr:`~sparse_attn.registry.Method.head_local`) only on the GQA groups holding those
   heads. With ``"exact"`` (the rule before 2026-12-02) every candidate estimates its whole
   pattern on every head.
3. Probe recall per head: ``last``: the one chunk's recall. ``spread``: the one-sided
   ``confidence`` (default 0.95) lower confidence bound of the mean chunk recall,
   ``mean - z * std / sqrt(n)`` over the ``n`` chunks (``std`` with Bessel's correction, ``z``
   the normal quantile of ``confidence``: 1.645 at 0.95; ``confidence=0.5`` tests the plain
   mean). With a single chunk (a sequence of one query block) it is that chunk's recall.
4. Choice: among the candidates whose probe recall reaches ``recall``, the one with the lowest
   density (ties: the earlier candidate). A head that no candidate serves gets the dense
   pattern (all causally valid blocks): the budget is then met exactly, at full cost, and
   :class:`AutoChoice` marks that head with ``DENSE``.

Defaults: ``recall=0.95`` of the softmax mass; ``density="probe"``; ``candidates=None`` takes
:data:`DEFAULT_CANDIDATES` (the registered training-free prefill estimators, a few settings
each); ``probe="spread"`` with ``probe_chunks=16``, ``probe_queries=None`` (whole query blocks)
and ``confidence=0.95`` (``probe="last"`` with ``probe_queries=64`` was the rule before, kept as
an option). Choices and limits:

- The last-query probe sees the last rows only. Recall there is a proxy for the whole head: for
  static and block-scored patterns the last rows see the longest context and usually keep the
  smallest share of it, but methods that estimate from the last queries themselves
  (``vertical_slash``, ``flexprefill``, ``proxyattn``, whose scoring samples exactly the rows
  the probe reads) are judged on the rows they fit. Measured on SmolLM2 (8K) and Gemma 3
  (16K) captured q/k (``benchmarks/recall_frontier.py``), judged on the true recall of all
  queries, the last-query probe met the budget on >= 95 % of heads in 1 of 4
  (model, target) cases; it credited ``proxyattn`` with +0.05 recall on average, up to +0.22.
- The spread probe reads every part of the sequence, so a candidate that serves only the last
  rows well is caught, and the lower bound asks for the budget to hold with a margin that
  grows with the spread of the chunk recalls. It was chosen after an offline replay on the
  data above (where it met the budget on >= 95 % of heads in all 4 cases). Held out
  (``benchmarks/results/cpu/recall_frontier_holdout.json``: other prompts, same models and
  lengths, both probes run for real; SmolLM2 on variable tracking at depth 0.2 and niah at
  depth 0.8, Gemma 3 on niah at depth 0.8 and variable tracking at depth 0.2, new seeds), the
  spread probe met the budget on >= 95 % of heads in 8 of 8 (model, prompt, target) cases
  (98.9-100 % of heads), the last-query probe in 3 of 8 (82-92 % in the others), and the
  spread probe's mean density was the lower of the two in all 8 (e.g. SmolLM2 at 0.95:
  0.431-0.433 against 0.483-0.540) and below the cheapest single candidate meeting the
  budget on >= 95 % of heads in all 8. It is the default for that reason.
- Cost of the spread probe: ``probe_chunks * probe_queries`` query rows (2048 at the defaults
  and ``block_q=128``) against dense attention's ``S``; spread evenly, they read on average as
  many keys per row as dense rows do, so it costs about ``2048 / S`` of dense attention: 25 %
  at 8K tokens, 6 % at 32K, 1.6 % at 128K (the last-query probe: 64 rows at full length, about
  ``128 / S``). Lower ``probe_chunks`` or ``probe_queries`` to spend less (fewer chunks widen
  the lower bound; the rule was validated at the defaults only). With the state cache it is
  paid once per refresh.
- ``flexprefill`` is a default candidate at ``gamma=0.9`` only. ``gamma=0.95`` was one until
  2026-12-02: on the held-out data below it served 7 of 408 (layer, head) choices, while it
  cost as much as the other settings' probed rows together at 1M tokens (each flexprefill
  setting selects over whole heads, so it computes every row even when judged on a few: 530
  ms of auto's 2.6 s on an H200). Add it to ``candidates`` to bring it back.
- ``tri_shape`` is not a default candidate: it keeps its last rows dense, so the last-query
  probe would always credit it with full recall. ``sale`` is not a default candidate for
  its cost: it scores every query-key pair (at 128K on an H200 0.88 times dense attention's
  time, from 8-bit tensor-core products of its codes), so it cannot pay for itself inside a
  probe (add it to ``candidates`` to compare).
- Candidates must use the call's blocks (``block_q``/``block_k``): ``moba`` (token-level,
  ``block_q = 1``) and the spatial methods are not candidates. A candidate that cannot run the
  case (e.g. ``xattention`` with blocks that are not a multiple of its stride) is skipped
  with one warning naming why.
- Cost. ``density="exact"``: every candidate estimates on every call, so the estimate costs the
  sum of theirs plus the probe (at 1M tokens on an H200, 32/8 heads: 7.7 s, 42 % of dense
  attention, and 24 GB beyond the pattern, fourteenth session,
  ``benchmarks/results/h200/estimators_scale_1m_s31e.json``, when the assembly also held a
  table as wide as the widest candidate). ``density="probe"`` (default since 2026-12-02): the
  probe, each candidate's rule on the probed query blocks (plus whatever it computes once per
  call before its rows, e.g. ``vertical_slash``'s last-query scores or ``flexprefill``'s whole
  heads), then each chosen candidate on the groups that chose it: about the cost of one
  estimator where the heads' choices agree, instead of the sum of all (at 1M tokens on an H200:
  889 ms, 4.3 % of dense attention, 336 MiB beyond the pattern, 2026-12-03,
  ``estimators_scale_1m_s33.json``; ``benchmarks/auto_parts.py`` splits it). Candidates that
  differ only in their selection (``xattention``'s three thresholds) compute their scores once
  per call (:mod:`sparse_attn.ops._shared_scores`: 72.5 ms for the three at 1M, 54 ms for one
  alone). The probe density
  is a sample of the head's rows: where the probed rows are not typical of a candidate it can
  rank candidates differently from ``"exact"`` (the budget check is the same in both: the
  probe recall of the candidate chosen). The held-out validation above ran with ``"exact"``.
  Each chosen head's rows are kept at that head's own width (:class:`_Assembly`); a
  candidate's pattern (on its groups) and the chosen rows (up to the result's size) are held
  together. :class:`AutoState` (``state=`` option) caches the choice across calls (per layer:
  one state per layer, e.g. through :func:`auto_layer_methods`) and only re-selects every
  ``refresh_every`` calls; in between only the chosen candidates estimate, each on the groups
  that chose it.
- Patterns are per query head (``kv_counts`` ``(B, Hq, n_q_blocks)``).
- The probe uses the softmax scale ``head_dim ** -0.5`` (estimators are not given the call's
  scale). Memory: the probe rows' scores a few query heads at a time (under half of
  ``CHUNK_ELEMENTS`` floats) and ``(B, Hq, chunks, n_kv_blocks)`` sums: ``O(S * block)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import torch

from ..checks import check_fraction, check_int
from ..geometry import num_blocks, query_block_positions
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops._dispatch import kernel_for
from ..ops._shared_scores import shared_scores
from ..ops.block_rows import query_block_index
from ..ops.gqa import gqa_group, grouped_matmul, head_chunks, kv_heads_of
from ..ops.last_query_probe import block_sum
from ..ops.to_pattern import RowsCaptured, capture_rows
from ..pattern import BlockSparsePattern, dense_pattern
from ..registry import HEAD_METHODS, get_method, register_method

__all__ = [
    "DENSE",
    "DEFAULT_CANDIDATES",
    "DENSITIES",
    "PROBES",
    "AutoChoice",
    "AutoConfig",
    "AutoState",
    "auto_layer_methods",
    "choose",
    "chunk_recall",
    "probe_block_mass",
    "probe_blocks",
    "pattern_rows",
    "probe_estimate",
    "rows_recall",
]

# The operator whose kernel computes the probe's block sums on CUDA (probe_block_mass).
_PROBE_KERNEL_PACKAGE = "sparse_attn.ops.last_query_probe"
# The candidate index of a head that no candidate served: it runs dense.
DENSE = -1
# The probes (module docstring, rule 1).
PROBES = ("last", "spread")
# How a candidate's cost is measured (module docstring, rule 2).
DENSITIES = ("probe", "exact")
# probe_queries when not given: per probe.
_LAST_QUERIES = 64

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
    ("flexprefill", {"gamma": 0.9}),  # gamma=0.95 was a default until 2026-12-02 (module docstring)
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
    its probe recall (at the last refresh; the lower bound for ``probe="spread"``) and its density on this call (float32 ``(B, Hq)``), the
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
    probe: str = "spread"
    probe_queries: int | None = None
    probe_chunks: int = 16
    confidence: float = 0.95
    density: str = "probe"
    state: AutoState | None = None

    def __post_init__(self) -> None:
        check_fraction("recall", self.recall)
        if self.probe not in PROBES:
            raise ValueError(f"probe must be one of {list(PROBES)}, got {self.probe!r}")
        check_int("probe_queries", self.probe_queries, minimum=1, allow_none=True)
        check_int("probe_chunks", self.probe_chunks, minimum=1)
        if isinstance(self.confidence, bool) or not isinstance(self.confidence, (int, float)):
            raise TypeError(f"confidence must be a float, got {type(self.confidence).__name__}")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence must be in [0.5, 1) (0.5: the plain mean), got {self.confidence}")
        if self.density not in DENSITIES:
            raise ValueError(f"density must be one of {list(DENSITIES)}, got {self.density!r}")
        candidates = DEFAULT_CANDIDATES if self.candidates is None else self.candidates
        object.__setattr__(self, "candidates", _normalized(candidates))
        if self.state is not None and not isinstance(self.state, AutoState):
            raise TypeError(f"state must be an AutoState or None, got {type(self.state).__name__}")


def probe_blocks(n_q: int, chunks: int) -> list[int]:
    """The query blocks the spread probe reads: ``chunks`` evenly spaced over ``n_q`` (first and last
    included), or every block when ``n_q <= chunks``."""
    if chunks >= n_q:
        return list(range(n_q))
    if chunks == 1:
        return [n_q - 1]
    return [round(i * (n_q - 1) / (chunks - 1)) for i in range(chunks)]


@torch.no_grad()
def probe_block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    query_blocks: Sequence[int],
    rows: int,
    block_q: int,
    block_k: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention mass per KV block of the last ``rows`` queries of each of ``query_blocks``.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)`` (queries are the last ``Sq`` positions when
    causal). For probed block ``c`` its last ``min(rows, rows in the block)`` queries are
    softmaxed (float32) against every key they see and summed over those queries per KV block.
    Returns the sums, float32 ``(B, Hq, len(query_blocks), n_kv_blocks)``, and the number of
    queries read per probed block, int64 ``(len(query_blocks),)`` (each query's softmax sums to
    1). On CUDA each probed block runs the last-query probe's kernel
    (:mod:`sparse_attn.ops.last_query_probe`) on the sequence cut after its rows; elsewhere (and
    where that kernel cannot run the case) the scores exist for one probed block and a few
    query heads at a time (under half of ``CHUNK_ELEMENTS`` floats).
    """
    batch, q_heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    n_kv = num_blocks(seq_k, block_k)
    group = gqa_group(q, k)
    offset = seq_k - seq_q
    scale_factor = torch.tensor([scale], dtype=torch.float32, device=q.device)
    mass = torch.zeros((batch, q_heads, len(query_blocks), n_kv), dtype=torch.float32, device=q.device)
    counts = []
    for chunk, block in enumerate(query_blocks):
        end = min((block + 1) * block_q, seq_q)
        start = max(block * block_q, end - rows)
        counts.append(end - start)
        visible = offset + end if causal else seq_k
        if visible <= 0:
            continue  # no query of this block sees a key
        probe, keys = q[:, :, start:end], k[:, :, :visible]
        # The probed rows are the last rows of the sequence cut at `visible` keys: the last-query
        # probe's kernel gives their per-block sums (its softmax tiled in registers, no score rows).
        kernel = kernel_for(probe, _PROBE_KERNEL_PACKAGE, k=keys, num_queries=end - start)
        if kernel is not None:
            summed = kernel.probe_last_queries_triton(
                probe, keys, num_queries=end - start, block_k=block_k, scale=scale, causal=causal, slash=False
            ).block
            mass[:, :, chunk, : summed.shape[-1]] = summed
            continue
        heads_per_chunk = max(1, CHUNK_ELEMENTS // (2 * batch * (end - start) * visible))
        for heads in head_chunks(q_heads, group, heads_per_chunk):
            chunk_q, chunk_k = probe[:, heads.start : heads.stop], keys[:, kv_heads_of(heads, group)]
            logits = (
                torch.matmul(chunk_q, chunk_k.transpose(-1, -2))
                if chunk_k.shape[1] == 1
                else grouped_matmul(chunk_q, chunk_k)
            ) * scale_factor
            if causal:
                positions = torch.arange(start, end, device=q.device) + offset
                logits.masked_fill_(torch.arange(visible, device=q.device) > positions[:, None], float("-inf"))
            # A row that sees no key (causal, Sk < Sq) softmaxes to NaN: it adds no mass.
            probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
            del logits
            summed = block_sum(probs.sum(-2), block_k)
            mass[:, heads.start : heads.stop, chunk, : summed.shape[-1]] = summed
            del probs
    return mass, torch.tensor(counts, dtype=torch.int64)


def pattern_rows(pattern: BlockSparsePattern, query_blocks: Sequence[int]) -> torch.Tensor:
    """``pattern``'s rows for ``query_blocks`` as a bool mask ``(B', H', len(query_blocks), n_kv_blocks)``
    (its own batch and heads; only those rows are expanded)."""
    rows = query_block_index(tuple(query_blocks), pattern.kv_counts.device)
    counts, indices = pattern.kv_counts[:, :, rows], pattern.kv_indices[:, :, rows].long()
    n_kv = pattern.num_kv_blocks
    used = torch.arange(indices.shape[-1], device=indices.device) < counts[..., None]
    kept = torch.zeros(*indices.shape[:3], n_kv + 1, dtype=torch.bool, device=indices.device)
    kept.scatter_(-1, torch.where(used, indices, n_kv), True)
    return kept[..., :-1]


def rows_recall(kept: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Per probed block, the probe mass inside the kept KV blocks over the block's total: float32
    ``(B', Hq, chunks)`` from bool ``kept`` ``(B', H', chunks, n_kv_blocks)`` (``H'``: ``mass``'s query
    heads or a divisor of them: lists per KV head serve their GQA group) and ``mass`` (see
    :func:`probe_block_mass`); a block with no mass counts as fully recalled."""
    kept = _per_query_head(kept, mass.shape[1])
    total = mass.sum(-1)
    inside = (mass * kept).sum(-1)
    return torch.where(total > 0, inside / total.clamp_min(1e-30), 1.0)


def chunk_recall(pattern: BlockSparsePattern, mass: torch.Tensor, query_blocks: Sequence[int]) -> torch.Tensor:
    """Per probed block, the probe mass inside the KV blocks ``pattern`` keeps for that query block, over
    the block's total: float32 ``(B', Hq, len(query_blocks))`` (``B'``: the pattern's batch, 1 or B).
    ``pattern`` has ``mass``'s query heads or a divisor of them (lists per KV head serve their GQA
    group; only the probed rows are expanded); a block with no mass counts as fully recalled."""
    return rows_recall(pattern_rows(pattern, query_blocks), mass)


def _heads_per_pattern_head(pattern_heads: int, q_heads: int) -> int:
    """How many query heads each of a pattern's heads serves (its GQA group; 1 for lists per query head)."""
    if q_heads % pattern_heads != 0:
        raise ValueError(f"cannot expand {pattern_heads} pattern heads to {q_heads} query heads")
    return q_heads // pattern_heads


def _per_query_head(x: torch.Tensor, q_heads: int) -> torch.Tensor:
    """``x`` (dim 1: a pattern's heads) repeated over each GQA group to ``q_heads`` heads."""
    group = _heads_per_pattern_head(x.shape[1], q_heads)
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def probe_estimate(recalls: torch.Tensor, confidence: float) -> torch.Tensor:
    """The one-sided ``confidence`` lower bound of the mean over the last dim of ``recalls``:
    ``mean - z * std / sqrt(n)`` (Bessel-corrected ``std``, ``z`` the normal quantile); the value
    itself when ``n == 1``."""
    n = recalls.shape[-1]
    mean = recalls.mean(-1)
    if n < 2:
        return mean
    z = NormalDist().inv_cdf(confidence)
    return mean - z * recalls.std(-1, correction=1) / math.sqrt(n)


class _Assembly:
    """The per-head result, built candidate by candidate.

    Each chosen head keeps its own rows (copied out of the candidate's pattern, trimmed to that
    head's widest list) until a better candidate replaces them; :meth:`finish` copies them into
    one table, as wide as the widest chosen head. So the result's rows, one candidate pattern
    and, at the end, the table are what is held: no table widened to every candidate's width
    and no copy of a candidate's rows beyond the heads it serves. A pattern that serves every
    head as it is (its own batch and query heads) is kept whole, not copied, and is the result
    if no later write replaces some of its heads.
    """

    def __init__(self, batch: int, heads: int, n_q: int, device) -> None:
        self.shape = (batch, heads, n_q)
        self.device = device
        self.rows: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.whole: BlockSparsePattern | None = None

    def write(
        self, pattern: BlockSparsePattern, heads: torch.Tensor, query_heads: range | None = None, *, whole: bool = True
    ) -> None:
        """Take ``pattern``'s rows for the (batch, query head) entries where ``heads`` is True
        (a pattern of batch 1 serves every batch row; lists per KV head serve their GQA group).
        ``query_heads``: the query heads the pattern's heads serve (default: all; a pattern
        estimated on some GQA groups serves theirs); entries of ``heads`` outside it are ignored."""
        query_heads = range(self.shape[1]) if query_heads is None else query_heads
        every = whole and len(query_heads) == self.shape[1] and bool(heads.all())
        if every and (pattern.batch, pattern.num_heads) == self.shape[:2]:
            self.rows.clear()
            self.whole = pattern
            return
        if self.whole is not None:  # some of its heads are replaced: the others become rows
            kept, self.whole = self.whole, None
            self.write(kept, torch.ones(self.shape[:2], dtype=torch.bool, device=heads.device), whole=False)
        group = _heads_per_pattern_head(pattern.num_heads, len(query_heads))
        widths = pattern.kv_counts.amax(-1).clamp_min(1).tolist()  # one synchronisation per write
        for b, h in heads[:, query_heads.start : query_heads.stop].nonzero().tolist():
            source_batch = b if pattern.batch > 1 else 0
            source_head = h // group
            h += query_heads.start
            width = widths[source_batch][source_head]
            self.rows[(b, h)] = (
                pattern.kv_counts[source_batch, source_head].clone(),
                pattern.kv_indices[source_batch, source_head, :, :width].clone(),
            )

    def finish(self, geometry: dict, causal: bool) -> BlockSparsePattern:
        if self.whole is not None:
            pattern, self.whole = self.whole, None
            return pattern
        if len(self.rows) != self.shape[0] * self.shape[1]:
            raise RuntimeError(f"auto: {len(self.rows)} heads assembled, expected {self.shape[0] * self.shape[1]}")
        width = max(indices.shape[-1] for _, indices in self.rows.values())
        counts = torch.zeros(self.shape, dtype=torch.int32, device=self.device)
        indices = torch.zeros((*self.shape, width), dtype=torch.int32, device=self.device)
        while self.rows:  # each head's rows freed as soon as they are in the table
            (b, h), (head_counts, head_indices) = self.rows.popitem()
            counts[b, h] = head_counts
            indices[b, h, :, : head_indices.shape[-1]] = head_indices
        pattern = BlockSparsePattern(kv_counts=counts, kv_indices=indices, **geometry)
        # Every row is a row of a valid pattern of the same geometry, so the result is valid.
        pattern._cache[("validated", causal)] = True
        return pattern


def _candidate_pattern(
    name: str, options: dict, q, k, *, causal: bool, geometry: dict, capture: Sequence[int] | None = None
) -> BlockSparsePattern | torch.Tensor | None:
    """The candidate's pattern, or None (with a warning) when it cannot run this case.

    With ``capture`` (query blocks), a candidate whose estimator streams its rows
    (:func:`~sparse_attn.ops.to_pattern.capture_rows`) computes those rows only and they are
    returned as a bool mask ``(B', H', len(capture), n_kv_blocks)``; others return their pattern.
    """
    spec = get_method(name)
    config = spec.make_config(**options)
    call = dict(causal=causal, block_q=geometry["block_q"], block_k=geometry["block_k"])
    try:
        if capture is None:
            pattern = spec.estimate(q, k, config, **call)
        else:
            with capture_rows(capture):
                pattern = spec.estimate(q, k, config, **call)
    except RowsCaptured as captured:
        return captured.mask
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


def _group_runs(heads: torch.Tensor, group: int) -> list[range]:
    """The query-head ranges, each a maximal run of consecutive whole GQA groups, holding every query
    head that ``heads`` (bool ``(B, Hq)``) marks in some batch row."""
    needed = heads.any(0).view(-1, group).any(1).tolist()
    runs, start = [], None
    for kv_head, wanted in enumerate([*needed, False]):
        if wanted and start is None:
            start = kv_head
        elif not wanted and start is not None:
            runs.append(range(start * group, kv_head * group))
            start = None
    return runs


def _run_chosen(
    assembly: _Assembly, candidate: tuple[str, dict], heads: torch.Tensor, q, k, *, causal: bool, geometry: dict
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Estimate ``candidate``'s whole pattern for the (batch, query head) entries ``heads`` marks and
    write their rows into ``assembly``. A head-local method runs on the GQA groups holding those
    heads only (one call per run of consecutive groups); others run on every head.

    Returns the exact density of each written head (float32 ``(B, Hq)``, other entries 0) and the
    heads written; ``(None, heads-not-written)`` when the candidate cannot run this case.
    """
    name, options = candidate
    spec = get_method(name)
    batch, q_heads = heads.shape
    group = gqa_group(q, k)
    runs = _group_runs(heads, group) if spec.is_head_local(spec.make_config(**options)) else [range(q_heads)]
    valid = _valid_blocks(geometry, causal)
    density = torch.zeros((batch, q_heads), device=q.device)
    for run in runs:
        kv = slice(run.start // group, run.stop // group)
        pattern = _candidate_pattern(
            name, options, q[:, run.start : run.stop], k[:, kv], causal=causal, geometry=geometry
        )
        if pattern is None:
            return None, heads
        assembly.write(pattern, heads, run)
        run_density = _per_query_head(_head_density(pattern, valid), len(run)).expand(batch, len(run))
        density[:, run.start : run.stop] = run_density
        del pattern
    return density, heads


def _valid_blocks(geometry: dict, causal: bool) -> int:
    """Causally valid (query block, KV block) pairs of one head (all pairs when not causal)."""
    n_q, n_kv = num_blocks(geometry["seq_q"], geometry["block_q"]), num_blocks(geometry["seq_k"], geometry["block_k"])
    if not causal:
        return n_q * n_kv
    return int(_valid_per_row(geometry, range(n_q)).sum())


def _valid_per_row(geometry: dict, query_blocks: Sequence[int]) -> torch.Tensor:
    """Causally valid KV blocks of each of ``query_blocks`` (int64; :func:`causal_block_mask`'s rule,
    counted without building the mask)."""
    seq_q, seq_k, block_q, block_k = (geometry[key] for key in ("seq_q", "seq_k", "block_q", "block_k"))
    _, last = query_block_positions(seq_q, seq_k, block_q)
    last = last[query_block_index(tuple(query_blocks), last.device)]
    return torch.clamp(torch.div(last, block_k, rounding_mode="floor") + 1, min=0, max=num_blocks(seq_k, block_k))


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
    valid = _valid_blocks(geometry, causal)
    labels = tuple(label(name, options) for name, options in config.candidates)
    assembly = _Assembly(batch, q_heads, n_q, q.device)
    state = config.state
    cached = state.cached(batch, q_heads) if state is not None else None
    # Candidates chosen for some heads whose rows are not yet in the assembly (judged on their probed rows).
    pending: set[int] = set()
    if cached is not None:
        index, recall, density = cached.index, cached.recall, cached.density.clone()
        pending = set(index.unique().tolist()) - {DENSE}
    else:
        if config.probe == "last":
            query_blocks = [n_q - 1]
            rows = _LAST_QUERIES if config.probe_queries is None else config.probe_queries
        else:
            query_blocks = probe_blocks(n_q, config.probe_chunks)
            rows = block_q if config.probe_queries is None else config.probe_queries
        mass, _ = probe_block_mass(
            q,
            k,
            query_blocks=query_blocks,
            rows=rows,
            block_q=block_q,
            block_k=block_k,
            scale=q.shape[-1] ** -0.5,
            causal=causal,
        )
        probed_valid = (
            int(_valid_per_row(geometry, query_blocks).sum())
            if causal
            else len(query_blocks) * num_blocks(seq_k, block_k)
        )
        capture = query_blocks if config.density == "probe" else None
        index = torch.full((batch, q_heads), DENSE, dtype=torch.int64, device=q.device)
        recall = torch.ones((batch, q_heads), device=q.device)
        density = torch.ones((batch, q_heads), device=q.device)
        # Settings of one method that score alike (xattention's thresholds) score once in this loop.
        with shared_scores():
            for position, (name, options) in enumerate(config.candidates):
                result = _candidate_pattern(name, options, q, k, causal=causal, geometry=geometry, capture=capture)
                if result is None:
                    continue
                if isinstance(result, torch.Tensor):  # the probed rows only: density from them
                    candidate_recall = probe_estimate(rows_recall(result, mass), config.confidence)
                    candidate_density = result.sum((-1, -2), dtype=torch.int64).float() / probed_valid
                else:  # the whole pattern (exact density; rows at hand)
                    # Per query head from the probed rows only: a pattern with lists per KV head is not expanded.
                    candidate_recall = probe_estimate(chunk_recall(result, mass, query_blocks), config.confidence)
                    candidate_density = _head_density(result, valid)
                candidate_recall = candidate_recall.expand(batch, q_heads)
                candidate_density = _per_query_head(candidate_density, q_heads).expand(batch, q_heads)
                meets = candidate_recall >= config.recall
                better = meets & ((index == DENSE) | (candidate_density < density))
                if bool(better.any()):
                    if isinstance(result, torch.Tensor):
                        pending.add(position)
                    else:
                        assembly.write(result, better)
                        pending.discard(position)
                    index = torch.where(better, position, index)
                    recall = torch.where(better, candidate_recall, recall)
                    density = torch.where(better, candidate_density, density)
                del result
    for position in sorted(pending):  # whole patterns of the chosen candidates, on the heads that chose them
        heads = index == position
        if not bool(heads.any()):
            continue
        exact, heads = _run_chosen(assembly, config.candidates[position], heads, q, k, causal=causal, geometry=geometry)
        if exact is None:  # cannot run this call's case: those heads run dense (until the next refresh)
            index = torch.where(heads, DENSE, index)
            continue
        density = torch.where(heads, exact, density)
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
    summary="per head, the sparsest candidate pattern whose probe recall (last queries, or a lower bound over "
    "spread query blocks) reaches `recall`; dense if none",
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
