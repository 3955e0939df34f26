"""`MaskedPattern`: a block pattern with a token-level rule inside its partial blocks, in a layout's order.

A :class:`~sparse_attn.pattern.BlockSparsePattern` computes every kept block whole (up to the
causal and sequence-bound rule). Spatial windows (neighbourhood attention at tile edges,
short border tiles) keep blocks of which only some (query, key) pairs belong to the window.
A :class:`MaskedPattern` carries, beside the block lists (unchanged: the same fields, the
same meaning):

* ``token_rule``: an object with ``allowed(q_pos, k_pos) -> bool tensor`` taking int64
  positions in the pattern's sequence (broadcasting, torch operations only, so the same rule
  serves the reference backend and FlexAttention's ``mask_mod``), and ``to(device)``. ``None``
  when every kept block is whole for the rule (the pattern is then *block-exact*);
* ``rule_partial``: bool, the shape of ``kv_indices``: the list entries inside which the rule
  removes some pairs. The other kept entries are whole for the rule.
* ``layout``: the :class:`~sparse_attn.layouts.Layout` whose tile order the pattern is
  expressed in, or ``None`` (the caller's order). :func:`sparse_attn.block_sparse_attention`
  permutes q, k and v into that order, computes, and returns the output (and log-sum-exp) in
  the caller's order.

Backends. ``reference`` evaluates the rule exactly on every gathered block (chunked: memory
stays O(S * block)); ``flex`` passes it to FlexAttention as the ``mask_mod`` of the partial
blocks and lists the rule-whole blocks as full blocks; ``triton`` (the block kernels, forward
and backward) reads it as per-block bitmasks built once per pattern from ``allowed`` on the
partial entries only (:func:`sparse_attn.plan.rule_bitmask`), applied where the kernels apply
the causal mask. A rule that offers a *box predicate* (``kernel_predicate()``, e.g. the grid
windows of ``neighborhood``; :mod:`sparse_attn.rule_predicate`) needs no bitmask in the forward:
the Triton and the Gluon forward kernels evaluate it from three int32 values per token (the
backward still reads bitmasks). FlashAttention-4 computes whole blocks only.

Routing (:func:`backend_for_token_rule`). On CUDA a rule with a box predicate runs on ``gluon``
where the Gluon kernel can run the case (``auto``, and ``gluon`` / ``flash4`` by name); other
rules go to ``flex`` unless ``triton`` was asked for by name (FlexAttention's ``mask_mod``
measured faster than the bitmasks, see there); ``triton`` runs any rule where its kernel can
(CUDA, or Triton's interpreter; query blocks of at least 16 rows), else ``flex`` (CUDA) or
``reference``, with one warning when another backend was asked for by name. A block-exact
``MaskedPattern`` (no rule) runs on every backend.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .layouts import Layout
from .pattern import BlockSparsePattern

__all__ = ["MaskedPattern", "backend_for_token_rule", "in_layout_order", "token_rule_of"]

_KERNEL_BACKENDS = ("auto", "triton", "gluon", "flash4")

# Whether auto (and gluon / flash4 by name) run a token rule that is a box predicate
# (:mod:`sparse_attn.rule_predicate`) on the Gluon kernel where it can run, instead of FlexAttention.
USE_GLUON_FOR_PREDICATES = True


@dataclass(frozen=True, eq=False, repr=False)
class MaskedPattern(BlockSparsePattern):
    """A :class:`BlockSparsePattern` with an optional token rule and layout (see the module docstring)."""

    token_rule: object | None = None
    rule_partial: torch.Tensor | None = None
    layout: Layout | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.token_rule is None) != (self.rule_partial is None):
            raise ValueError("token_rule and rule_partial must be given together")
        if self.token_rule is not None:
            if not callable(getattr(self.token_rule, "allowed", None)):
                raise TypeError("token_rule must have an allowed(q_pos, k_pos) method")
            if self.rule_partial.dtype != torch.bool or self.rule_partial.shape != self.kv_indices.shape:
                raise ValueError(
                    f"rule_partial must be a bool tensor of kv_indices' shape {tuple(self.kv_indices.shape)}, "
                    f"got {self.rule_partial.dtype} {tuple(self.rule_partial.shape)}"
                )
        if self.layout is not None:
            if not isinstance(self.layout, Layout):
                raise TypeError(f"layout must be a sparse_attn.layouts.Layout, got {type(self.layout).__name__}")
            self.layout.check_sequence("seq_q", self.seq_q)
            self.layout.check_sequence("seq_k", self.seq_k)

    @classmethod
    def over_layout(
        cls,
        pattern: BlockSparsePattern,
        layout: Layout,
        *,
        token_rule: object | None = None,
        rule_partial: torch.Tensor | None = None,
    ) -> MaskedPattern:
        """``pattern``'s lists (over ``layout``'s tile order) with the layout and an optional token rule;
        keeps ``pattern``'s validation results."""
        return cls._same_lists(pattern, token_rule=token_rule, rule_partial=rule_partial, layout=layout)

    def _with_lists(self, kv_counts, kv_indices, rule_partial, token_rule) -> MaskedPattern:
        """Same pattern in other tensors (all replaced at once, so the shapes always agree)."""
        return dataclasses.replace(
            self,
            kv_counts=kv_counts,
            kv_indices=kv_indices,
            rule_partial=rule_partial,
            token_rule=token_rule,
            _cache=self._validated(),
        )

    def to(self, device) -> MaskedPattern:
        rule = None if self.token_rule is None else self.token_rule.to(device)
        partial = None if self.rule_partial is None else self.rule_partial.to(device)
        return self._with_lists(self.kv_counts.to(device), self.kv_indices.to(device), partial, rule)

    def expand_heads(self, num_q_heads: int) -> MaskedPattern:
        if self.rule_partial is None or self.num_heads == num_q_heads:
            return super().expand_heads(num_q_heads)
        if num_q_heads % self.num_heads != 0:
            raise ValueError(f"cannot expand {self.num_heads} pattern heads to {num_q_heads} query heads")
        group = num_q_heads // self.num_heads
        lists = (self.kv_counts, self.kv_indices, self.rule_partial)
        counts, indices, partial = (x.repeat_interleave(group, dim=1) for x in lists)
        return self._with_lists(counts, indices, partial, self.token_rule)

    def tile_order(self) -> MaskedPattern:
        """The same pattern for q, k, v that are already in the layout's tile order (no permutation
        inside the call). A model can permute once per forward pass instead of once per attention
        call: ``out = layout.unpermute(sa.block_sparse_attention(layout.permute(q), ..., pattern.tile_order()))``."""
        return dataclasses.replace(self, layout=None)

    def union(self, other: BlockSparsePattern, *, causal: bool = True) -> BlockSparsePattern:
        raise TypeError(
            "union is not defined for a MaskedPattern (its token rule and layout do not combine with other "
            "patterns); combine the block masks of plain patterns instead"
        )

    def __repr__(self) -> str:
        rule = (
            "none"
            if self.token_rule is None
            else f"{type(self.token_rule).__name__} in {self.partial_entries()} blocks"
        )
        return f"Masked{super().__repr__()[:-1]}, token_rule={rule}, layout={self.layout})"

    def partial_entries(self) -> int:
        """How many kept (batch, head, query block, KV block) entries the token rule cuts inside."""
        if self.rule_partial is None:
            return 0
        used = torch.arange(self.max_kv, device=self.device) < self.kv_counts[..., None]
        return int((self.rule_partial & used).sum())


def token_rule_of(pattern: BlockSparsePattern):
    """The pattern's token rule, or ``None`` (a plain pattern, or a block-exact masked one)."""
    return getattr(pattern, "token_rule", None)


def backend_for_token_rule(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, *, return_lse: bool
) -> str:
    """The backend to consider for ``pattern``: ``backend`` itself unless the pattern has a token
    rule and ``backend`` is a kernel that cannot evaluate it (``gluon``, ``flash4``) or ``auto``.

    With a token rule that offers a box predicate (:mod:`sparse_attn.rule_predicate`), on CUDA,
    ``auto``, ``gluon`` and ``flash4`` (one warning) take ``gluon`` where the Gluon kernel can run
    the case (:data:`USE_GLUON_FOR_PREDICATES`), else ``triton`` (below). Measured on the H200
    with exact neighbourhood windows (``benchmarks/results/h200/token_rules.json``): Gluon 11.70
    vs Triton 14.99 ms at HunyuanVideo's 30x48x80 grid + 256 text tokens and 0.85 vs 1.07 at a
    128x128 image + 512 text; FlexAttention's ``mask_mod`` on the same blocks took 29.92 and 1.77
    ms. At Wan 2.1's 21x45x80 (75,600 tokens, not a multiple of 128) the Gluon kernel was slower
    (20.49 vs 16.56 ms) until its predicate and its bounds mask became one fused test
    (twenty-fourth session, ``neighborhood_block_k_fused_s43.json``: 18.74 -> 11.57 ms against
    the Triton kernel's 13.81), so ragged lengths now take it too. Other token
    rules: on CUDA, ``auto`` (and ``gluon`` / ``flash4`` with one warning) take ``flex``: measured on an H200 with 3D neighbourhood windows, where the rule cuts every kept
    block, FlexAttention's ``mask_mod`` ran 1.7x faster than the Triton kernel's per-block bitmasks
    (58.6 vs 98.3 ms forward at Wan 2.1's 21x45x80 grid, 40 heads;
    ``benchmarks/results/h200/neighborhood_speed.json``). ``triton`` asked for by name runs its
    block kernel with the bitmasks (and, off CUDA, ``gluon`` / ``flash4`` fall back to it with one
    warning); where it cannot run the case, ``flex`` on CUDA, else ``reference`` (one warning
    naming why). ``auto`` off CUDA stays ``auto`` (the reference backend, as for every pattern)."""
    if token_rule_of(pattern) is None or backend not in _KERNEL_BACKENDS:
        return backend
    if backend == "auto" and q.device.type != "cuda":
        return backend
    has_predicate = kernel_predicate_of(pattern) is not None
    if backend != "triton" and q.device.type == "cuda" and has_predicate and USE_GLUON_FOR_PREDICATES:
        from .backends import gluon as gluon_backend

        if gluon_backend.unsupported_reason(q, k, v, pattern, return_lse=return_lse) is None:
            if backend == "flash4":
                warnings.warn(
                    "the flash4 backend computes whole blocks and this pattern has a token-level rule inside "
                    f"{pattern.partial_entries()} of its blocks: using the gluon backend (it evaluates the rule)",
                    stacklevel=4,
                )
            return "gluon"
    if backend != "triton" and q.device.type == "cuda" and not has_predicate:
        if backend != "auto":
            warnings.warn(
                f"the {backend} backend computes whole blocks and this pattern has a token-level rule inside "
                f"{pattern.partial_entries()} of its blocks: using the flex backend (measured faster on such "
                "patterns than the triton kernel's bitmasks)",
                stacklevel=4,
            )
        return "flex"
    from .backends import triton as triton_backend

    reason = triton_backend.unsupported_reason(q, k, v, pattern, return_lse=return_lse)
    if reason is None:
        if backend not in ("auto", "triton"):
            warnings.warn(
                f"the {backend} backend computes whole blocks and this pattern has a token-level rule inside "
                f"{pattern.partial_entries()} of its blocks: using the triton backend",
                stacklevel=4,
            )
        return "triton"
    fallback = "flex" if q.device.type == "cuda" else "reference"
    if backend != "auto":
        warnings.warn(
            f"this pattern has a token-level rule inside {pattern.partial_entries()} of its blocks, which the "
            f"{backend} backend cannot evaluate and the triton kernel cannot run here ({reason}): "
            f"using the {fallback} backend",
            stacklevel=4,
        )
    return fallback


def kernel_predicate_of(pattern: BlockSparsePattern):
    """The pattern's token rule as a box predicate the kernels evaluate, or ``None``."""
    from .rule_predicate import kernel_predicate

    return kernel_predicate(pattern)


def in_layout_order(pattern: BlockSparsePattern, run: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``run(q, k, v)`` in the pattern's layout order: inputs permuted, outputs (a tensor or a tuple
    of ``(B, H, S, ...)`` tensors) un-permuted. Without a layout, just ``run(q, k, v)``."""
    layout = getattr(pattern, "layout", None)
    if layout is None or layout.is_identity:
        return run(q, k, v)
    result = run(layout.permute(q), layout.permute(k), layout.permute(v))
    if isinstance(result, tuple):
        return tuple(layout.unpermute(x) for x in result)
    return layout.unpermute(result)
