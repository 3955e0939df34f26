"""`BlockSparsePattern`: which KV blocks each query block attends to.

This is the only thing that flows between estimators (which decide) and backends
(which compute). It is plain data, like FlexAttention's ``BlockMask``:

* ``kv_counts``  int32 ``(B, H, n_q_blocks)``: how many KV blocks each query block keeps;
* ``kv_indices`` int32 ``(B, H, n_q_blocks, max_kv)``: the kept KV block numbers, sorted
  ascending; entries at or past the count are padding and are never read;
* ``block_q``, ``block_k``: block sizes in tokens; ``seq_q``, ``seq_k``: sequence lengths.

Geometry. Keys are cut into blocks from position 0: KV block ``j`` holds keys
``[j * block_k, min((j + 1) * block_k, seq_k))``. Queries are the *last* ``seq_q`` of the
``seq_k`` positions (chunked prefill), cut into blocks from the first query: query block
``i`` holds query rows ``[i * block_q, min((i + 1) * block_q, seq_q))``, which sit at
positions ``seq_k - seq_q + row``.

Heads. ``H`` is the number of query heads (one list per query head), the number of KV
heads (one list shared by the query heads of a GQA group), or 1 (one list for all heads). ``B`` is the batch size
or 1 (one pattern for every sequence of the batch).

Causal validity. In causal mode a block is *valid* when its first key is not after the
last query of the query block, and the *diagonal* blocks of a query block are those that
hold the positions of its own queries: every query sees itself, so no row is ever empty.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from .checks import check_bool, check_int
from .geometry import causal_block_mask, diagonal_block_mask, num_blocks, own_kv_block_span

__all__ = [
    "BlockSparsePattern",
    "check_pattern_fits",
    "dense_pattern",
    "random_pattern",
]


@dataclass(frozen=True, eq=False)
class BlockSparsePattern:
    """Per (batch, head, query block), the sorted list of KV blocks to compute.

    See the module docstring for the geometry. Construct one with :meth:`from_mask`,
    :func:`dense_pattern`, :func:`random_pattern` or an estimator; building one by hand is
    allowed, and :meth:`validate` (run automatically before its first use by a backend)
    checks the contents.
    """

    kv_counts: torch.Tensor
    kv_indices: torch.Tensor
    block_q: int
    block_k: int
    seq_q: int
    seq_k: int
    # Facts derived from the contents, computed once: validation results, backend plans.
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("block_q", "block_k"):
            check_int(name, getattr(self, name))
        for name in ("seq_q", "seq_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.seq_k < self.seq_q:
            raise ValueError(
                f"seq_k must be >= seq_q (queries are the last seq_q positions), got {self.seq_k} < {self.seq_q}"
            )
        if not isinstance(self.kv_counts, torch.Tensor) or not isinstance(self.kv_indices, torch.Tensor):
            raise TypeError("kv_counts and kv_indices must be torch.Tensor")
        if self.kv_counts.dtype != torch.int32 or self.kv_indices.dtype != torch.int32:
            raise TypeError(
                f"kv_counts and kv_indices must be int32, got {self.kv_counts.dtype} and {self.kv_indices.dtype}"
            )
        if self.kv_counts.dim() != 3:
            raise ValueError(f"kv_counts must have shape (B, H, n_q_blocks), got {tuple(self.kv_counts.shape)}")
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"kv_indices must have shape (B, H, n_q_blocks, max_kv) = {tuple(self.kv_counts.shape)} + (max_kv,), "
                f"got {tuple(self.kv_indices.shape)}"
            )
        if self.kv_counts.shape[0] == 0 or self.kv_counts.shape[1] == 0:
            raise ValueError(f"kv_counts must have a batch and heads of at least 1, got {tuple(self.kv_counts.shape)}")
        if self.kv_counts.shape[2] != self.num_q_blocks:
            raise ValueError(
                f"kv_counts has {self.kv_counts.shape[2]} query blocks, but seq_q={self.seq_q} with "
                f"block_q={self.block_q} needs {self.num_q_blocks}"
            )
        if self.kv_counts.device != self.kv_indices.device:
            raise ValueError("kv_counts and kv_indices must be on the same device")

    # Shape and geometry -------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self.kv_counts.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_counts.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.seq_q, self.block_q)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.seq_k, self.block_k)

    @property
    def max_kv(self) -> int:
        return self.kv_indices.shape[3]

    @property
    def device(self) -> torch.device:
        return self.kv_counts.device

    def causal_block_mask(self) -> torch.Tensor:
        return causal_block_mask(self.seq_q, self.seq_k, self.block_q, self.block_k, self.device)

    def diagonal_block_mask(self) -> torch.Tensor:
        return diagonal_block_mask(self.seq_q, self.seq_k, self.block_q, self.block_k, self.device)

    def _slot_is_used(self) -> torch.Tensor:
        slots = torch.arange(self.max_kv, device=self.device, dtype=torch.int32)
        return slots < self.kv_counts[..., None]

    # Conversions --------------------------------------------------------------------
    def to_mask(self) -> torch.Tensor:
        """Dense bool block mask ``(B, H, n_q_blocks, n_kv_blocks)``. For tests and plots only."""
        mask = torch.zeros(
            (self.batch, self.num_heads, self.num_q_blocks, self.num_kv_blocks + 1),
            dtype=torch.bool,
            device=self.device,
        )
        # Unused slots scatter into a spare last column, dropped below.
        columns = torch.where(self._slot_is_used(), self.kv_indices.long(), self.num_kv_blocks)
        columns = columns.clamp(0, self.num_kv_blocks)
        mask.scatter_(3, columns, True)
        return mask[..., : self.num_kv_blocks]

    @classmethod
    def from_mask(
        cls,
        mask: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        seq_q: int,
        seq_k: int,
        causal: bool = True,
    ) -> BlockSparsePattern:
        """Build a pattern from a bool block mask ``(n_q, n_kv)``, ``(H, n_q, n_kv)`` or ``(B, H, n_q, n_kv)``.

        In causal mode blocks after the diagonal are dropped and the diagonal blocks are
        added, so the result is always valid. In non-causal mode every query block must
        keep at least one block.
        """
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        _check_geometry(seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        if mask.dim() != 4:
            raise ValueError(f"mask must have 2 to 4 dimensions, got shape {tuple(mask.shape)}")
        if mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"mask must have a batch and heads of at least 1, got shape {tuple(mask.shape)}")
        n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
        if mask.shape[2:] != (n_q, n_kv):
            raise ValueError(
                f"mask must end in (n_q_blocks, n_kv_blocks) = ({n_q}, {n_kv}) for seq_q={seq_q}, seq_k={seq_k}, "
                f"block_q={block_q}, block_k={block_k}; got {tuple(mask.shape)}"
            )
        if causal:
            mask = (mask & causal_block_mask(seq_q, seq_k, block_q, block_k, mask.device)) | diagonal_block_mask(
                seq_q, seq_k, block_q, block_k, mask.device
            )
        counts = mask.sum(dim=-1, dtype=torch.int32)
        if not causal and bool((counts == 0).any()):
            raise ValueError("mask leaves a query block with no KV block; every query block needs at least one")
        max_kv = max(int(counts.max()), 1)
        # A stable sort of "not kept" puts the kept block numbers first, in ascending order.
        order = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices[..., :max_kv]
        indices = torch.where(torch.arange(max_kv, device=mask.device) < counts[..., None], order, 0).to(torch.int32)
        pattern = cls(
            kv_counts=counts.contiguous(),
            kv_indices=indices.contiguous(),
            block_q=block_q,
            block_k=block_k,
            seq_q=seq_q,
            seq_k=seq_k,
        )
        pattern._cache[("validated", bool(causal))] = True
        return pattern

    def _validated(self) -> dict:
        """This pattern's validation results, to carry over to a pattern with the same lists."""
        return {key: True for key in self._cache if key[0] == "validated"}

    def _with_tensors(self, kv_counts: torch.Tensor, kv_indices: torch.Tensor) -> BlockSparsePattern:
        """Same contents in other tensors: keeps the validation results, drops backend plans."""
        return dataclasses.replace(self, kv_counts=kv_counts, kv_indices=kv_indices, _cache=self._validated())

    @classmethod
    def _same_lists(cls, pattern: BlockSparsePattern, **fields):
        """A ``cls`` with ``pattern``'s lists, block sizes and lengths plus ``fields`` (a subclass's
        own); keeps ``pattern``'s validation results."""
        names = ("kv_counts", "kv_indices", "block_q", "block_k", "seq_q", "seq_k")
        derived = cls(**{name: getattr(pattern, name) for name in names}, **fields)
        derived._cache.update(pattern._validated())
        return derived

    def to(self, device) -> BlockSparsePattern:
        return self._with_tensors(self.kv_counts.to(device), self.kv_indices.to(device))

    def union(self, other: BlockSparsePattern, *, causal: bool = True) -> BlockSparsePattern:
        """Blocks kept by either pattern. Batch and head counts broadcast (1 against n)."""
        if not isinstance(other, BlockSparsePattern):
            raise TypeError(f"other must be a BlockSparsePattern, got {type(other).__name__}")
        geometry = ("block_q", "block_k", "seq_q", "seq_k")
        if any(getattr(self, name) != getattr(other, name) for name in geometry):
            raise ValueError(
                "patterns must share block_q, block_k, seq_q and seq_k to be combined: "
                f"{[getattr(self, n) for n in geometry]} vs {[getattr(other, n) for n in geometry]}"
            )
        return BlockSparsePattern.from_mask(
            self.to_mask() | other.to(self.device).to_mask(),
            block_q=self.block_q,
            block_k=self.block_k,
            seq_q=self.seq_q,
            seq_k=self.seq_k,
            causal=causal,
        )

    def expand_heads(self, num_q_heads: int) -> BlockSparsePattern:
        """A per-query-head view of a per-KV-head pattern (each list repeated over its GQA group)."""
        check_int("num_q_heads", num_q_heads)
        if self.num_heads == num_q_heads:
            return self
        if num_q_heads % self.num_heads != 0:
            raise ValueError(f"cannot expand {self.num_heads} pattern heads to {num_q_heads} query heads")
        group = num_q_heads // self.num_heads
        return self._with_tensors(
            self.kv_counts.repeat_interleave(group, dim=1), self.kv_indices.repeat_interleave(group, dim=1)
        )

    # Statistics and checks ----------------------------------------------------------
    def density(self, *, causal: bool = True) -> float:
        """Computed blocks over valid blocks (causal-valid in causal mode, all blocks otherwise)."""
        if causal:  # per query block, the KV blocks up to the one holding its last position
            _, last = own_kv_block_span(self.seq_q, self.seq_k, self.block_q, self.block_k)
            valid = int((last + 1).sum())
        else:
            valid = self.num_q_blocks * self.num_kv_blocks
        return float(self.kv_counts.sum(dtype=torch.int64)) / (valid * self.batch * self.num_heads)

    def validate(self, *, causal: bool = True) -> BlockSparsePattern:
        """Check the contents; raise ``ValueError`` saying what is wrong. Returns ``self``.

        Checks: counts in ``[1, max_kv]``, used indices in ``[0, n_kv_blocks)``, strictly
        increasing (sorted, unique), and in causal mode causally valid with every diagonal
        block present.
        """
        counts = self.kv_counts
        if bool((counts < 1).any()) or bool((counts > self.max_kv).any()):
            raise ValueError(
                f"kv_counts must be in [1, max_kv={self.max_kv}] for every query block; "
                f"found values in [{int(counts.min())}, {int(counts.max())}]"
            )
        used = self._slot_is_used()
        indices = self.kv_indices
        if bool(((indices < 0) | (indices >= self.num_kv_blocks))[used].any()):
            raise ValueError(f"kv_indices has entries outside [0, n_kv_blocks={self.num_kv_blocks})")
        if self.max_kv > 1:
            increasing = indices[..., 1:] > indices[..., :-1]
            if bool((~increasing & used[..., 1:]).any()):
                raise ValueError("kv_indices must be strictly increasing (sorted, no repeats) within each count")
        if causal:
            # From the lists themselves (O(kept entries)): no (n_q_blocks, n_kv_blocks) table,
            # which token-level patterns (block_q = 1) would make O(S^2 / block_k).
            first, last = own_kv_block_span(self.seq_q, self.seq_k, self.block_q, self.block_k, self.device)
            blocks = indices.long()
            if bool(((blocks > last[:, None]) & used).any()):
                raise ValueError("pattern keeps KV blocks after the query block's last position (not causal)")
            # Indices are unique, so the own span is all there when the list holds span-many of it.
            own = ((blocks >= first[:, None]) & (blocks <= last[:, None]) & used).sum(-1)
            if bool((own < (last - first + 1)).any()):
                raise ValueError(
                    "pattern misses a diagonal block: in causal mode every query block keeps its own positions"
                )
        self._cache[("validated", bool(causal))] = True
        return self

    def ensure_valid(self, *, causal: bool) -> None:
        """Run :meth:`validate` once per pattern and mode (backends call this before computing)."""
        if ("validated", bool(causal)) not in self._cache:
            self.validate(causal=causal)

    def cached_plan(self, key):
        """A backend's precomputed metadata for this pattern (plan once, run many times), or None."""
        return self._cache.get(("plan", key))

    def store_plan(self, key, value):
        self._cache[("plan", key)] = value
        return value

    def __repr__(self) -> str:
        return (
            f"BlockSparsePattern(batch={self.batch}, heads={self.num_heads}, seq_q={self.seq_q}, seq_k={self.seq_k}, "
            f"block=({self.block_q}, {self.block_k}), q_blocks={self.num_q_blocks}, max_kv={self.max_kv}, "
            f"device={self.device})"
        )


def _check_geometry(*, causal, **sizes) -> None:
    """Every size an int >= 1 and ``causal`` a bool, each named in the error."""
    for name, value in sizes.items():
        check_int(name, value)
    check_bool("causal", causal)


def dense_pattern(
    *,
    batch: int = 1,
    heads: int = 1,
    seq_q: int,
    seq_k: int | None = None,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = True,
    device=None,
) -> BlockSparsePattern:
    """Every valid block (the full causal triangle, or everything when not causal)."""
    seq_k = seq_q if seq_k is None else seq_k
    _check_geometry(batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal)
    shape = (batch, heads, num_blocks(seq_q, block_q), num_blocks(seq_k, block_k))
    mask = torch.ones(shape, dtype=torch.bool, device=device)
    return BlockSparsePattern.from_mask(mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal)


def random_pattern(
    *,
    batch: int = 1,
    heads: int = 1,
    seq_q: int,
    seq_k: int | None = None,
    density: float,
    seed: int = 0,
    block_q: int = 128,
    block_k: int = 128,
    causal: bool = True,
    device=None,
) -> BlockSparsePattern:
    """Random pattern keeping ``round(density * valid)`` blocks per query block (at least the diagonal).

    Deterministic for a given seed and device. In causal mode the diagonal blocks are
    always kept, so very low densities keep slightly more than asked.
    """
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in [0, 1], got {density!r}")
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise ValueError(f"density must be in [0, 1], got {density}")
    check_int("seed", seed, minimum=0)
    if seed >= 2**63:
        raise ValueError(f"seed must be < 2**63, got {seed}")
    seq_k = seq_q if seq_k is None else seq_k
    _check_geometry(batch=batch, heads=heads, seq_q=seq_q, seq_k=seq_k, block_q=block_q, block_k=block_k, causal=causal)
    n_q, n_kv = num_blocks(seq_q, block_q), num_blocks(seq_k, block_k)
    valid = (
        causal_block_mask(seq_q, seq_k, block_q, block_k, device)
        if causal
        else torch.ones((n_q, n_kv), dtype=torch.bool, device=device)
    )
    generator = torch.Generator(device=device if device is not None else "cpu").manual_seed(seed)
    scores = torch.rand((batch, heads, n_q, n_kv), generator=generator, device=device)
    if causal:
        scores = scores + 2.0 * diagonal_block_mask(seq_q, seq_k, block_q, block_k, device)
    scores = scores.masked_fill(~valid, -1.0)
    keep = torch.round(valid.sum(-1) * density).clamp(min=1)
    rank = torch.argsort(torch.argsort(scores, dim=-1, descending=True), dim=-1)
    mask = (rank < keep[:, None]) & valid
    return BlockSparsePattern.from_mask(mask, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=causal)


def check_pattern_fits(pattern, q: torch.Tensor, k: torch.Tensor) -> None:
    """The pattern's geometry must match the tensors it is applied to."""
    if not isinstance(pattern, BlockSparsePattern):
        raise TypeError(f"pattern must be a BlockSparsePattern, got {type(pattern).__name__}")
    batch, q_heads, seq_q, _ = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    if pattern.seq_q != seq_q or pattern.seq_k != seq_k:
        raise ValueError(
            f"pattern is for seq_q={pattern.seq_q}, seq_k={pattern.seq_k} but the tensors have "
            f"seq_q={seq_q}, seq_k={seq_k}"
        )
    if pattern.batch not in (1, batch):
        raise ValueError(f"pattern batch must be 1 or the batch size {batch}, got {pattern.batch}")
    if pattern.num_heads not in (1, q_heads, kv_heads):
        raise ValueError(
            f"pattern heads must be 1, the query heads ({q_heads}) or the KV heads ({kv_heads}), got {pattern.num_heads}"
        )
    if pattern.device != q.device:
        raise ValueError(f"pattern is on {pattern.device} but q is on {q.device}; use pattern.to(q.device)")
