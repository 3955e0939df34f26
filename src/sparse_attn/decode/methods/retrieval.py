"""Retrieval: the keys nearest the query found through a clustered vector index of the cache, on the GPU.

Papers: Di Liu, Meng Chen, Baotong Lu, Huiqiang Jiang, Zhenhua Han, Qianxi Zhang, Qi Chen,
Chengruidong Zhang, Bailu Ding, Kai Zhang, Chen Chen, Fan Yang, Yuqing Yang, Lili Qiu,
"RetrievalAttention: Accelerating Long-Context LLM Inference via Vector Retrieval", NeurIPS
2025, arXiv:2409.10516; and its successor, Yaoqi Chen et al., "RetroInfer: A Vector-Storage
Approach for Scalable Long-Context LLM Inference", 2025, arXiv:2505.02922.

Rule (RetrievalAttention's split): a static part of the cache is always read, the attention
sinks (the first ``sink_tokens``) and the newest tokens; the rest is found by approximate
nearest-neighbour search over the keys with the query (maximum inner product: the keys with
the largest ``q · k`` carry the attention), and attention runs exactly over the union.
RetrievalAttention searches a graph index on the CPU built from the prefill queries' nearest
keys; a graph walk is a chain of dependent steps, so here, as in RetroInfer (which moves the
index to clusters of keys for the GPU), the index is an inverted file of clusters:

- **Index.** The keys between the sinks and the newest ``window_tokens`` are cut into segments
  of ``segment_tokens`` consecutive tokens, and each segment, per KV head, into
  ``ceil(n / cluster_size)`` clusters by k-means (RetroInfer's segmented clustering: clusters
  stay local to a segment, so the index is built and extended one segment at a time). Each
  cluster keeps its centroid (the mean of its keys) and its member tokens.
- **Search.** The group's summed query scores every centroid (``q · c`` is the mean logit of
  the cluster's keys); clusters are taken best first while their members fit in what the
  budget leaves after the static tokens, and every member of a taken cluster is read.
- **Updates.** Tokens appended after the index was built are read as static tokens (they are
  the newest) until ``window_tokens + update_tokens`` have gathered past the indexed ones; the
  oldest of them, all but the newest ``window_tokens``, are then clustered as a new segment.

Defaults: ``token_budget=2048``; ``sink_tokens=4`` and ``window_tokens=64`` (RetroInfer's
steady zone of 4 initial and 64 recent tokens), ``cluster_size=16`` and ``segment_tokens=8192``
(RetroInfer's clusters of about 16 tokens over 8192-token segments). These four come from
RetroInfer's configuration files as seen in a public fork of its released repository
(``static_pattern_start=4``, ``static_pattern_end=64``, one centroid per 16 tokens, one segment
per 8192 tokens); they were not checked against either paper's text here. RetrievalAttention's
own static pattern, its top-k and its graph index (nearest keys of prefill queries, ``q_knn`` /
degree) are not used.

Choices where the papers are silent or that differ from them:

- k-means: Lloyd's iterations on the keys (Euclidean), ``kmeans_iters=10``, started from keys
  evenly spaced in the segment (deterministic); the centroids are the means of the final
  clusters (a cluster left empty keeps its last centroid and holds no token). Products in the
  keys' dtype on CUDA (bf16 tensor cores), float32 elsewhere; centroids stored in the keys' dtype.
- The budget counts tokens read: the static tokens (sinks, and everything after the index,
  fewer than ``window_tokens + update_tokens``) and the members of taken clusters. Clusters
  are taken in score order until the next one would not fit (a prefix, so a large cluster can
  end the search while smaller ones below it would fit); a sequence within the budget reads
  every token. The budget must exceed ``sink_tokens + window_tokens + update_tokens``.
- RetroInfer's estimation zone (centroid-based attention estimates for the next clusters) and
  both papers' CPU offload are not implemented: every key stays in the GPU cache, the index
  only chooses which are read.
- GQA: one search per KV head, centroids ranked by the group's summed ``q · c`` (the group rule
  of ``quest``); ``update_tokens=128`` and ``dense_layers=0`` are this library's choices.
- ``reselect_every=R`` (default 1; not in either paper): as ``quest``'s option (LServe,
  arXiv:2502.14866), one search serves ``R`` consecutive steps. The retrieved members are kept;
  the static tokens follow the cache, so the tokens appended since are read too and a step may
  read up to ``R - 1`` tokens over the budget. An index update forces a new search. Its speed
  on the GPU has not been measured.
- The index is built lazily by the first decode step of each layer (the cache's
  ``selection_memo``, cleared by ``crop``). That step and each update (every ``update_tokens``
  steps) run k-means and allocate new index tensors, so a captured CUDA graph must not span
  an update; the steps in between read only device tensors with fixed shapes.

Measured (H200, 32/8 heads, d128, bf16; ``docs/decode.md``): at 128K context, batch 8, budget 2048 the
search takes 228 µs of kernels and the attention 27 µs (a graphed step 0.19x of cuDNN's graphed
dense decode), the index 477 ms to build per layer; on Gemma 3 270M at 16K with a 4096-token
budget it answered as dense decode on 9 cases and reproduced 256 free-running greedy tokens.

Memory: per cluster a centroid in the keys' dtype, an int32 size and an int64 first-member
offset, and one int32 member id per indexed token: at bf16, ``D = 128``, 16-token clusters,
16.75 + 4 bytes per token and KV head against the keys' 256 (8.1 % of the keys, 4.1 % of keys
and values).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...checks import check_int
from ...ops.centroid_scores import centroid_scores
from ..registry import register_decode_method
from ..selection import DecodeSelection, dense_selection, reuse_window_covers

__all__ = ["RetrievalConfig", "RetrievalIndex", "kmeans", "retrieval_tokens"]

# Rows of (segment x KV head) clustered at once: bounds the float32 (rows, n, clusters) product.
KMEANS_ELEMENTS = 1 << 27


@dataclass(frozen=True)
class RetrievalConfig:
    token_budget: int = 2048
    sink_tokens: int = 4
    window_tokens: int = 64
    cluster_size: int = 16
    segment_tokens: int = 8192
    update_tokens: int = 128
    kmeans_iters: int = 10
    dense_layers: int = 0
    reselect_every: int = 1

    def __post_init__(self):
        check_int("token_budget", self.token_budget)
        check_int("sink_tokens", self.sink_tokens, minimum=0)
        check_int("window_tokens", self.window_tokens, minimum=0)
        check_int("cluster_size", self.cluster_size)
        check_int("segment_tokens", self.segment_tokens)
        check_int("update_tokens", self.update_tokens)
        check_int("kmeans_iters", self.kmeans_iters, minimum=0)
        check_int("dense_layers", self.dense_layers, minimum=0)
        check_int("reselect_every", self.reselect_every)
        static = self.sink_tokens + self.window_tokens + self.update_tokens
        if self.token_budget <= static:
            raise ValueError(
                f"token_budget ({self.token_budget}) must exceed sink_tokens + window_tokens + update_tokens "
                f"({static}): those tokens can all be static at one step"
            )


def kmeans(x: torch.Tensor, clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of each row's points: ``x`` ``(N, n, D)`` -> float32 centroids ``(N, clusters, D)``
    (the means of the final clusters; an empty cluster keeps its last centroid), int64 assignment
    ``(N, n)`` and int64 sizes ``(N, clusters)``. Starts from points evenly spaced along ``n``."""
    rows, n, dim = x.shape
    if not 1 <= clusters <= n:
        raise ValueError(f"clusters must be in [1, {n}] for {n} points, got {clusters}")
    work = x.dtype if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    points = x.to(work)
    points32 = x.float()
    start = (torch.arange(clusters, device=x.device) * n) // clusters
    centroids = points32[:, start]
    for _ in range(iters + 1):
        # argmin |x - c|^2 = argmax (x . c - |c|^2 / 2)
        scores = torch.matmul(points, centroids.to(work).transpose(1, 2)).float()
        assign = (scores - 0.5 * centroids.square().sum(-1)[:, None, :]).argmax(-1)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign[..., None].expand(-1, -1, dim), points32)
        sizes = torch.zeros((rows, clusters), dtype=torch.long, device=x.device).scatter_add_(
            1, assign, torch.ones_like(assign)
        )
        centroids = torch.where(sizes[..., None] > 0, sums / sizes.clamp(min=1)[..., None], centroids)
    return centroids, assign, sizes


@dataclass
class _Segment:
    """One clustered segment of one sequence, every KV head: tokens ``[start, end)``."""

    start: int
    end: int
    centroids: torch.Tensor  # (Hkv, c, D), keys' dtype
    sizes: torch.Tensor  # (Hkv, c) int32
    members: torch.Tensor  # (Hkv, n) int32 token ids, grouped by cluster in cluster order


@dataclass
class RetrievalIndex:
    """The clustered index of one layer's cache (module docstring), kept in ``cache.selection_memo``.

    Host state: per sequence its segments and ``indexed_end`` (tokens ``[sink_tokens, indexed_end)``
    are indexed). Device state, padded over the batch (rebuilt when a segment is added):
    ``centroids`` ``(B, Hkv, C, D)``, ``sizes`` ``(B, Hkv, C)`` int32 (0: padding), ``starts``
    ``(B, Hkv, C)`` int64 (a cluster's first member in ``members``), ``members`` ``(B, Hkv, N)`` int32,
    ``tail_start`` ``(B,)`` int64 (every token from there on is read).
    """

    config: RetrievalConfig
    segments: list[list[_Segment]]
    indexed_end: list[int]
    centroids: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    starts: torch.Tensor | None = None
    members: torch.Tensor | None = None
    tail_start: torch.Tensor | None = None
    # ``reselect_every``: the last search's members in rank order, how many were taken, and the
    # host lengths it saw (dropped when the index changes).
    search: tuple | None = None

    @staticmethod
    def empty(cache, config: RetrievalConfig) -> RetrievalIndex:
        return RetrievalIndex(config, [[] for _ in range(cache.batch)], [0] * cache.batch)

    def update(self, cache) -> None:
        """Cluster, per sequence, the tokens past the index and before the window once there are
        ``update_tokens`` of them (all of them at the first step), then repack the device tensors."""
        config = self.config
        spans = []
        for b, length in enumerate(cache.lengths):
            first = max(self.indexed_end[b], config.sink_tokens)
            last = length - config.window_tokens
            fresh = not self.segments[b]
            if last - first >= (1 if fresh else config.update_tokens):
                spans.append((b, first, last))
        if not spans:
            return
        self._cluster(cache, spans)
        self._pack(cache)
        self.search = None

    def _cluster(self, cache, spans) -> None:
        config = self.config
        pieces = []  # (b, start, end, keys (Hkv, n, D))
        for b, first, last in spans:
            keys = cache.keys(b, first, last)
            for start in range(first, last, config.segment_tokens):
                end = min(start + config.segment_tokens, last)
                pieces.append((b, start, end, keys[:, start - first : end - first]))
            self.indexed_end[b] = last
        by_length: dict[int, list] = {}
        for piece in pieces:
            by_length.setdefault(piece[2] - piece[1], []).append(piece)
        for n, group in by_length.items():
            clusters = -(-n // config.cluster_size)
            per_row = max(1, KMEANS_ELEMENTS // (n * clusters))
            keys = torch.cat([piece[3] for piece in group])  # (len(group) * Hkv, n, D)
            parts = [kmeans(chunk, clusters, config.kmeans_iters) for chunk in keys.split(per_row)]
            centroids, assign, sizes = (torch.cat(part) for part in zip(*parts, strict=True))
            # Members grouped by cluster (stable: token order inside a cluster).
            order = torch.sort(assign, dim=-1, stable=True).indices
            for i, (b, start, end, _) in enumerate(group):
                rows = slice(i * cache.kv_heads, (i + 1) * cache.kv_heads)
                self.segments[b].append(
                    _Segment(
                        start,
                        end,
                        centroids[rows].to(cache.dtype),
                        sizes[rows].to(torch.int32),
                        (order[rows] + start).to(torch.int32),
                    )  # fmt: skip
                )

    def _pack(self, cache) -> None:
        batch, heads, dim, device = cache.batch, cache.kv_heads, cache.head_dim, cache.device
        clusters = max(1, max(sum(s.sizes.shape[1] for s in segs) for segs in self.segments))
        tokens = max(1, max(sum(s.end - s.start for s in segs) for segs in self.segments))
        self.centroids = torch.zeros((batch, heads, clusters, dim), dtype=cache.dtype, device=device)
        self.sizes = torch.zeros((batch, heads, clusters), dtype=torch.int32, device=device)
        self.members = torch.zeros((batch, heads, tokens), dtype=torch.int32, device=device)
        for b, segs in enumerate(self.segments):
            if not segs:
                continue
            c = sum(s.sizes.shape[1] for s in segs)
            n = sum(s.end - s.start for s in segs)
            self.centroids[b, :, :c] = torch.cat([s.centroids for s in segs], 1)
            self.sizes[b, :, :c] = torch.cat([s.sizes for s in segs], 1)
            self.members[b, :, :n] = torch.cat([s.members for s in segs], 1)
        # A cluster's members start where the previous clusters' end (segments are concatenated
        # in order and each segment's members are grouped in cluster order).
        self.starts = torch.cumsum(self.sizes.long(), -1) - self.sizes.long()
        # Every token from here on is read (static): int64 (B,).
        tails = [max(end, self.config.sink_tokens) for end in self.indexed_end]
        self.tail_start = torch.tensor(tails, dtype=torch.long, device=device)


def retrieval_tokens(q: torch.Tensor, cache, index: RetrievalIndex) -> DecodeSelection:
    """This step's token selection from ``index`` (module docstring): device work of fixed shapes
    (no host reads, no uploads), so a step between index updates can be replayed from a CUDA graph.

    Entry ``j`` of a row is a sink for ``j < s``, the ``j - s``-th token from the index's end for
    ``j < s + t`` (``s`` sinks and ``t`` static tokens after the index, per sequence), and after
    that the members of the taken clusters, best cluster first. With ``reselect_every=R`` a search
    serves the next ``R - 1`` steps too: its members are kept, the static tokens follow the cache."""
    config = index.config
    lengths = cache.seq_lens.long()[:, None, None]
    sinks = lengths.clamp(max=config.sink_tokens)
    tail_start = index.tail_start[:, None, None]
    statics = sinks + (lengths - tail_start).clamp(min=0)
    steps = config.reselect_every
    memo = index.search
    if steps == 1 or memo is None or not reuse_window_covers(memo[2], cache.lengths, steps):
        memo = (*_search(q, index, config.token_budget - statics), tuple(cache.lengths))
        index.search = memo if steps > 1 else None
    by_rank, taken, _ = memo
    # Up to steps - 1 tokens appended since the search are read on top of the budget.
    width = config.token_budget + steps - 1
    slot = torch.arange(width, device=q.device).expand(q.shape[0], cache.kv_heads, width)
    member = (slot - statics).clamp(0, by_rank.shape[-1] - 1)
    static = torch.where(slot < sinks, slot, tail_start + slot - sinks)
    tokens = torch.where(slot < statics, static.to(torch.int32), torch.gather(by_rank, 2, member))
    counts = (statics + taken)[..., 0].to(torch.int32).expand(q.shape[0], cache.kv_heads)
    return DecodeSelection(tokens.contiguous(), counts.contiguous(), 1)


def _search(q: torch.Tensor, index: RetrievalIndex, room: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clusters by the group's summed q . centroid, best first, and the prefix of them whose
    members fit ``room`` (int64, broadcastable to ``(B, Hkv, 1)``): their members in rank order,
    int32 ``(B, Hkv, budget)`` (the first ``taken`` valid), and ``taken`` int64 ``(B, Hkv, 1)``.
    Empty clusters score ``-inf`` and are never taken, so ``budget`` candidates hold any room."""
    batch, heads = index.sizes.shape[:2]
    budget = index.config.token_budget
    scores = centroid_scores(q, index.centroids, index.sizes)
    ranked = scores.topk(min(scores.shape[-1], budget), dim=-1).indices
    sizes = torch.gather(index.sizes.long(), 2, ranked).masked_fill(torch.gather(scores, 2, ranked).isneginf(), 0)
    ends = torch.cumsum(sizes, -1)
    taken = torch.where(ends <= room, sizes, 0).sum(-1, keepdim=True)
    member = torch.arange(budget, device=q.device).expand(batch, heads, budget).contiguous()
    rank = torch.searchsorted(ends, member, right=True).clamp(max=ranked.shape[-1] - 1)
    within = member - (torch.gather(ends, 2, rank) - torch.gather(sizes, 2, rank))
    first = torch.gather(torch.gather(index.starts, 2, ranked), 2, rank)
    position = (first + within).clamp(0, index.members.shape[-1] - 1)
    return torch.gather(index.members, 2, position), taken


@register_decode_method(
    "retrieval",
    config=RetrievalConfig,
    paper="RetrievalAttention (arXiv:2409.10516), RetroInfer (arXiv:2505.02922)",
    summary="sinks + recent tokens, and the keys nearest q found through a clustered (IVF) index of "
    "the cache built on the GPU; token-level",
)
def select_retrieval(q, cache, config: RetrievalConfig, *, layer: int, state: dict) -> DecodeSelection:
    if layer < config.dense_layers:
        return dense_selection(cache)
    key = ("retrieval", config)
    index = cache.selection_memo.get(key)
    if index is None:  # the first step, or the first after a crop (which clears the memo)
        index = cache.selection_memo[key] = RetrievalIndex.empty(cache, config)
    index.update(cache)
    if index.centroids is None:  # nothing indexed yet: every token is static
        return dense_selection(cache)
    return retrieval_tokens(q, cache, index)
