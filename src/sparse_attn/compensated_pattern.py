"""`CompensatedPattern`: exact blocks plus blocks a backend *compensates* instead of skipping (PSA, SLA).

A :class:`~sparse_attn.pattern.BlockSparsePattern` computes its listed blocks exactly and
nothing for the others. The compensation family changes what a kernel computes for some of the
blocks it would otherwise skip (issue 19); a :class:`CompensatedPattern` carries, beside the
unchanged block lists (the *exact* blocks: PSA's level 0, SLA's critical blocks), a second set
of lists:

* ``comp_counts`` int32 ``(B, H, n_q_blocks)`` and ``comp_indices`` int32
  ``(B, H, n_q_blocks, max_comp)``: per query block, the compensated KV blocks, sorted
  ascending, disjoint from the exact list (entries at or past the count are padding);
* ``comp_levels`` int8, ``comp_indices``' shape: each entry's kind.

  - ``l`` in ``1 .. MAX_POOL_LEVEL`` (*pooled*, PSA): the block's keys and values are replaced
    by their means over aligned groups of ``2**l`` positions (a group never crosses a block:
    ``block_k`` must be a multiple of ``2**l``; the last group of the sequence averages the
    positions it has). Each pooled key joins the query's softmax beside the exact keys with its
    score raised by ``ln(n)``, ``n`` the number of keys it averages: one pooled key stands for
    ``n`` keys, so a block of equal keys gets the weight it has in exact attention.
  - ``LINEAR`` (``-1``, SLA): the block joins the query's *linear attention* with feature map
    ``feature_map`` (``phi``), a separate output ``O_l = phi(q) H / (phi(q) . z)`` with
    ``H = sum_j phi(K_j)^T V_j`` and ``z = sum_j phi(K_j)^T 1`` over the query block's linear
    entries (``O_l = 0`` for a query block with none), added to the softmax output through the
    linear projection ``projection``: ``out = O_softmax + O_l W^T + b``. ``projection`` is
    ``(W, b)`` (``W`` ``(D, D)``, ``b`` ``(D,)`` or ``None``) or ``None``, the zero map (SLA's
    initialisation), with which the linear branch is not computed at all.

Blocks in neither list are skipped. ``feature_map`` is ``"softmax"`` (over the head dimension,
per token), ``"elu"`` (``elu(x) + 1``) or ``"relu"``, applied to the unscaled q and k.
``layout``: as :class:`~sparse_attn.masked_pattern.MaskedPattern`'s (the pattern is in the
layout's tile order; q, k, v are permuted inside the call). The log-sum-exp a call returns is
that of the softmax (exact and pooled keys); the linear branch has none.

Causal mode is supported exactly where it is well defined: every compensated block must lie
entirely at or before the first query position of its query block (a pooled or linear block
never straddles a query's own position), which :meth:`CompensatedPattern.validate` checks; the
exact blocks follow the usual causal rule. The methods (``psa``, ``sla``) are bidirectional.

Backends (:func:`resolve_compensated_backend`): ``reference``
(:mod:`sparse_attn.backends.compensated_reference`, plain PyTorch, chunked, differentiable) and
the Triton kernel (:mod:`sparse_attn.backends.triton_compensated`, forward only), which runs
the exact, pooled and linear work of a query block in one program. ``auto`` takes the kernel on
CUDA and the reference elsewhere; ``flex`` runs the reference and ``gluon`` / ``flash4`` the
kernel, with one warning (they have no compensation). Inputs that require grad, and cases the
kernel cannot run, take the reference with one warning. The projection is applied in PyTorch
after either backend, so its weight is differentiable on both.

Memory: the second lists are as long as the compensated work (``O(n_q_blocks * kept)`` per
head); the linear branch adds per-block states ``(n_kv_blocks + 1, D, D + 1)`` float32 per
(batch, KV head) while a call runs, never anything ``O(S^2)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .layouts import Layout
from .masked_pattern import in_layout_order
from .pattern import BlockSparsePattern

__all__ = [
    "EXACT",
    "FEATURE_MAPS",
    "LINEAR",
    "MAX_POOL_LEVEL",
    "SKIP",
    "CompensatedPattern",
    "compensated_attention",
    "resolve_compensated_backend",
]

EXACT = 0
LINEAR = -1
SKIP = -2  # only in level maps (CompensatedPattern.from_levels): the block is not computed
MAX_POOL_LEVEL = 4
FEATURE_MAPS = ("softmax", "elu", "relu")


def _check_projection(projection) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``projection`` as ``(weight, bias)`` or ``None``, checked (shapes, floating dtypes, one device)."""
    if projection is None:
        return None
    if not isinstance(projection, tuple) or len(projection) != 2:
        raise TypeError(f"projection must be None or a (weight, bias) tuple, got {type(projection).__name__}")
    weight, bias = projection
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"projection weight must be a floating torch.Tensor, got {getattr(weight, 'dtype', weight)!r}")
    if weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        raise ValueError(f"projection weight must be a square (D, D) matrix, got shape {tuple(weight.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
            raise TypeError(f"projection bias must be None or a floating torch.Tensor, got {type(bias).__name__}")
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"projection bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != weight.device:
            raise ValueError("projection weight and bias must be on the same device")
    return weight, bias


@dataclass(frozen=True, eq=False, repr=False)
class CompensatedPattern(BlockSparsePattern):
    """Exact block lists plus compensated (pooled or linear) block lists; see the module docstring."""

    comp_counts: torch.Tensor | None = None
    comp_indices: torch.Tensor | None = None
    comp_levels: torch.Tensor | None = None
    feature_map: str = "softmax"
    projection: tuple | None = None
    layout: Layout | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        lists = (self.comp_counts, self.comp_indices, self.comp_levels)
        if any(x is None for x in lists):
            raise ValueError("comp_counts, comp_indices and comp_levels must all be given")
        if not all(isinstance(x, torch.Tensor) for x in lists):
            raise TypeError("comp_counts, comp_indices and comp_levels must be torch.Tensor")
        if self.comp_counts.dtype != torch.int32 or self.comp_indices.dtype != torch.int32:
            raise TypeError(
                f"comp_counts and comp_indices must be int32, got {self.comp_counts.dtype} and {self.comp_indices.dtype}"
            )
        if self.comp_levels.dtype != torch.int8:
            raise TypeError(f"comp_levels must be int8, got {self.comp_levels.dtype}")
        if self.comp_counts.shape != self.kv_counts.shape:
            raise ValueError(
                f"comp_counts must have kv_counts' shape {tuple(self.kv_counts.shape)}, got {tuple(self.comp_counts.shape)}"
            )
        if self.comp_indices.dim() != 4 or self.comp_indices.shape[:3] != self.kv_counts.shape:
            raise ValueError(
                f"comp_indices must have shape {tuple(self.kv_counts.shape)} + (max_comp,), "
                f"got {tuple(self.comp_indices.shape)}"
            )
        if self.comp_levels.shape != self.comp_indices.shape:
            raise ValueError(
                f"comp_levels must have comp_indices' shape {tuple(self.comp_indices.shape)}, "
                f"got {tuple(self.comp_levels.shape)}"
            )
        if any(x.device != self.device for x in lists):
            raise ValueError("comp_counts, comp_indices and comp_levels must be on kv_counts' device")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        object.__setattr__(self, "projection", _check_projection(self.projection))
        if self.layout is not None:
            if not isinstance(self.layout, Layout):
                raise TypeError(f"layout must be a sparse_attn.layouts.Layout, got {type(self.layout).__name__}")
            self.layout.check_sequence("seq_q", self.seq_q)
            self.layout.check_sequence("seq_k", self.seq_k)

    # Shape ------------------------------------------------------------------------------
    @property
    def max_comp(self) -> int:
        return self.comp_indices.shape[3]

    def _comp_used(self) -> torch.Tensor:
        slots = torch.arange(self.max_comp, device=self.device, dtype=torch.int32)
        return slots < self.comp_counts[..., None]

    def has_linear(self) -> bool:
        """Whether any compensated entry is linear (SLA)."""
        return bool(((self.comp_levels == LINEAR) & self._comp_used()).any())

    def pooled_levels(self) -> tuple[int, ...]:
        """The pooling levels its pooled entries use, ascending."""
        used = self.comp_levels[self._comp_used()]
        return tuple(int(level) for level in torch.unique(used[used > 0]).tolist())

    # Construction -------------------------------------------------------------------------
    @classmethod
    def from_levels(
        cls,
        levels: torch.Tensor,
        *,
        block_q: int,
        block_k: int,
        seq_q: int,
        seq_k: int,
        causal: bool = False,
        feature_map: str = "softmax",
        projection=None,
        layout: Layout | None = None,
    ) -> CompensatedPattern:
        """Build from a level map, int8 ``(B, H, n_q_blocks, n_kv_blocks)`` (or without leading dims):
        ``EXACT`` (0), a pooling level ``1 .. MAX_POOL_LEVEL``, ``LINEAR`` or ``SKIP`` per block pair.

        Every query block needs at least one exact block. The result is validated (``causal``)."""
        if not isinstance(levels, torch.Tensor) or levels.dtype != torch.int8:
            raise TypeError(f"levels must be an int8 tensor, got {getattr(levels, 'dtype', type(levels).__name__)}")
        while levels.dim() < 4:
            levels = levels.unsqueeze(0)
        allowed = (
            (levels == EXACT) | (levels == LINEAR) | (levels == SKIP) | ((levels >= 1) & (levels <= MAX_POOL_LEVEL))
        )
        if not bool(allowed.all()):
            raise ValueError(f"levels must hold EXACT (0), 1..{MAX_POOL_LEVEL}, LINEAR (-1) or SKIP (-2)")
        exact = BlockSparsePattern.from_mask(
            levels == EXACT, block_q=block_q, block_k=block_k, seq_q=seq_q, seq_k=seq_k, causal=False
        )
        compensated = (levels != EXACT) & (levels != SKIP)
        counts = compensated.sum(-1, dtype=torch.int32)
        max_comp = max(int(counts.max()), 1)
        order = torch.sort((~compensated).to(torch.uint8), dim=-1, stable=True).indices[..., :max_comp]
        used = torch.arange(max_comp, device=levels.device) < counts[..., None]
        indices = torch.where(used, order, 0).to(torch.int32)
        comp_levels = torch.where(used, torch.gather(levels, -1, order), 0).to(torch.int8)
        pattern = cls(
            kv_counts=exact.kv_counts,
            kv_indices=exact.kv_indices,
            block_q=block_q,
            block_k=block_k,
            seq_q=seq_q,
            seq_k=seq_k,
            comp_counts=counts.contiguous(),
            comp_indices=indices.contiguous(),
            comp_levels=comp_levels.contiguous(),
            feature_map=feature_map,
            projection=projection,
            layout=layout,
        )
        return pattern.validate(causal=causal)

    def to_levels(self) -> torch.Tensor:
        """The dense int8 level map ``(B, H, n_q_blocks, n_kv_blocks)`` (``SKIP`` where unlisted). For tests."""
        shape = (self.batch, self.num_heads, self.num_q_blocks, self.num_kv_blocks + 1)
        levels = torch.full(shape, SKIP, dtype=torch.int8, device=self.device)
        spare = self.num_kv_blocks
        comp = torch.where(self._comp_used(), self.comp_indices.long(), spare)
        levels.scatter_(3, comp, self.comp_levels)
        exact = torch.where(self._slot_is_used(), self.kv_indices.long(), spare)
        levels.scatter_(3, exact, torch.zeros_like(exact, dtype=torch.int8))
        return levels[..., : self.num_kv_blocks]

    def exact(self) -> BlockSparsePattern:
        """The plain pattern of the exact blocks (the compensated ones skipped)."""
        return BlockSparsePattern(
            kv_counts=self.kv_counts,
            kv_indices=self.kv_indices,
            block_q=self.block_q,
            block_k=self.block_k,
            seq_q=self.seq_q,
            seq_k=self.seq_k,
        )

    @property
    def token_rule(self) -> None:
        """``None``: compensated patterns have no token-level rule (every listed block is whole)."""
        return None

    def tile_order(self) -> CompensatedPattern:
        """The same pattern for q, k, v already in the layout's tile order (no permutation inside the call),
        as :meth:`sparse_attn.masked_pattern.MaskedPattern.tile_order`."""
        return dataclasses.replace(self, layout=None, _cache=self._cache)

    def _with(self, **fields) -> CompensatedPattern:
        """Same pattern with other tensors; drops validation results and plans (new contents)."""
        return dataclasses.replace(self, _cache={}, **fields)

    def to(self, device) -> CompensatedPattern:
        names = ("kv_counts", "kv_indices", "comp_counts", "comp_indices", "comp_levels")
        moved = {name: getattr(self, name).to(device) for name in names}
        if self.projection is not None:
            weight, bias = self.projection
            moved["projection"] = (weight.to(device), None if bias is None else bias.to(device))
        return self._with(**moved)

    def expand_heads(self, num_q_heads: int) -> CompensatedPattern:
        if self.num_heads == num_q_heads:
            return self
        if num_q_heads % self.num_heads != 0:
            raise ValueError(f"cannot expand {self.num_heads} pattern heads to {num_q_heads} query heads")
        group = num_q_heads // self.num_heads
        names = ("kv_counts", "kv_indices", "comp_counts", "comp_indices", "comp_levels")
        return self._with(**{name: getattr(self, name).repeat_interleave(group, dim=1) for name in names})

    def union(self, other: BlockSparsePattern, *, causal: bool = True) -> BlockSparsePattern:
        raise TypeError(
            "union is not defined for a CompensatedPattern (its compensated lists do not combine with other "
            "patterns); combine level maps (to_levels) instead"
        )

    # Statistics and checks ------------------------------------------------------------------
    def compensated_density(self) -> float:
        """Compensated entries over all block pairs (the exact ones: :meth:`density` with ``causal=False``)."""
        total = self.num_q_blocks * self.num_kv_blocks * self.batch * self.num_heads
        return float(self.comp_counts.sum(dtype=torch.int64)) / total

    def validate(self, *, causal: bool = True) -> CompensatedPattern:
        """The exact lists' checks (:meth:`BlockSparsePattern.validate`), then the compensated lists':
        counts in ``[0, max_comp]``, indices in range, strictly increasing and disjoint from the exact
        list, levels ``LINEAR`` or ``1 .. MAX_POOL_LEVEL`` with ``block_k`` a multiple of ``2**level``,
        and in causal mode every compensated block at or before its query block's first position."""
        super().validate(causal=causal)
        counts, indices, levels = self.comp_counts, self.comp_indices, self.comp_levels
        if bool((counts < 0).any()) or bool((counts > self.max_comp).any()):
            raise ValueError(
                f"comp_counts must be in [0, max_comp={self.max_comp}]; found [{int(counts.min())}, {int(counts.max())}]"
            )
        used = self._comp_used()
        if bool(((indices < 0) | (indices >= self.num_kv_blocks))[used].any()):
            raise ValueError(f"comp_indices has entries outside [0, n_kv_blocks={self.num_kv_blocks})")
        if self.max_comp > 1 and bool((~(indices[..., 1:] > indices[..., :-1]) & used[..., 1:]).any()):
            raise ValueError("comp_indices must be strictly increasing (sorted, no repeats) within each count")
        used_levels = levels[used]
        if bool(((used_levels != LINEAR) & ((used_levels < 1) | (used_levels > MAX_POOL_LEVEL))).any()):
            raise ValueError(f"comp_levels must be LINEAR (-1) or a pooling level in 1..{MAX_POOL_LEVEL}")
        for level in self.pooled_levels():
            if self.block_k % (1 << level):
                raise ValueError(
                    f"pooling level {level} averages groups of {1 << level} keys, which must not cross a block: "
                    f"block_k={self.block_k} must be a multiple of {1 << level}"
                )
        # Disjointness in O(kept): sort the exact and compensated entries of each row together
        # (unused slots get distinct values past every block) and look for neighbours that are equal.
        spare = self.num_kv_blocks
        exact = torch.where(
            self._slot_is_used(), self.kv_indices.long(), spare + torch.arange(self.max_kv, device=self.device)
        )
        comp = torch.where(used, indices.long(), spare + self.max_kv + torch.arange(self.max_comp, device=self.device))
        merged = torch.sort(torch.cat([exact, comp], -1), dim=-1).values
        if bool((merged[..., 1:] == merged[..., :-1]).any()):
            raise ValueError("a KV block is listed both as exact and as compensated for one query block")
        if causal:
            # The first query position of each query block; a compensated block's last key must not pass it.
            first = (self.seq_k - self.seq_q) + torch.arange(self.num_q_blocks, device=self.device) * self.block_q
            last_key = torch.clamp((indices.long() + 1) * self.block_k, max=self.seq_k) - 1
            if bool(((last_key > first[:, None]) & used).any()):
                raise ValueError(
                    "in causal mode a compensated block must lie at or before its query block's first position "
                    "(pooled and linear blocks are not masked inside)"
                )
        self._cache[("validated", bool(causal))] = True
        return self

    def __repr__(self) -> str:
        kinds = "linear" if self.has_linear() else f"pooled levels {self.pooled_levels()}"
        return (
            f"Compensated{super().__repr__()[:-1]}, max_comp={self.max_comp}, compensated={kinds}, "
            f"feature_map={self.feature_map}, projection={'zero' if self.projection is None else 'given'}, "
            f"layout={self.layout})"
        )


def resolve_compensated_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: CompensatedPattern, *, return_lse: bool
) -> str:
    """``"triton"`` (:mod:`.backends.triton_compensated`) or ``"reference"``
    (:mod:`.backends.compensated_reference`) for this case; warns once per reason when a backend
    asked for by name cannot run it (see the module docstring)."""
    from .backends import resolve_own_kernel

    return resolve_own_kernel(
        backend, q, k, v, pattern, kernel="triton_compensated",
        lacks="has no compensation for pooled or linear blocks", kernel_label="the triton compensated kernel",
        reference_label="the compensated reference", return_lse=return_lse,
    )  # fmt: skip


def compensated_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: CompensatedPattern,
    *,
    causal: bool,
    scale: float,
    backend: str,
    return_lse: bool = False,
):
    """Attention over ``pattern``'s exact blocks with its compensated ones, on the backend
    :func:`resolve_compensated_backend` picks; checked inputs as in :func:`sparse_attn.block_sparse_attention`.

    Returns ``out`` ``(B, Hq, Sq, D)`` in q's dtype (``O_softmax + O_l W^T + b``, see the module
    docstring) and, with ``return_lse``, the softmax's float32 log-sum-exp ``(B, Hq, Sq)``."""
    if pattern.projection is not None and pattern.projection[0].shape[0] != q.shape[-1]:
        raise ValueError(
            f"the pattern's projection is {tuple(pattern.projection[0].shape)} but head_dim is {q.shape[-1]}"
        )
    name = resolve_compensated_backend(backend, q, k, v, pattern, return_lse=return_lse)
    if name == "triton":
        from .backends import triton_compensated as module
    else:
        from .backends import compensated_reference as module

    def run(q, k, v):
        out, lse, linear = module.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
        if pattern.projection is not None:
            # O = O_softmax + O_l W^T + b on every row (O_l = 0 where a query block has no linear entry).
            weight, bias = pattern.projection
            projected = None if linear is None else torch.matmul(linear.float(), weight.float().t())
            if bias is not None:
                projected = bias.float() if projected is None else projected + bias.float()
            if projected is not None:
                out = (out.float() + projected).to(q.dtype)
        return (out, lse) if return_lse else out

    return in_layout_order(pattern, run, q, k, v)
