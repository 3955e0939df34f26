"""`SkipThresholdPattern`: a candidate block list whose blocks the kernel may skip on the fly (BLASST).

A :class:`~sparse_attn.pattern.BlockSparsePattern` says which blocks to compute; an estimator
decides before the attention runs. BLASST (:mod:`sparse_attn.methods.blasst`) decides inside
the attention kernel: the pattern lists the *candidate* blocks, and while a query block walks
them with the online softmax, a candidate whose scores are all far below the running maximum
is skipped (no exp, no P·V). A :class:`SkipThresholdPattern` carries, beside the
unchanged block lists, that rule's one parameter:

* ``skip_threshold``: ``λ`` in ``[0, 1]``. While query block ``i`` walks its candidates, block
  ``j`` is skipped when, for every row ``r`` of the query block, its largest scaled score
  ``max_c s[r, c]`` is below ``m[r] + ln λ`` (``m[r]``: the running maximum over the blocks the
  row has computed so far), i.e. ``exp(max_c s[r, c] - m[r]) < λ``: every weight of the block
  is below ``λ`` times the largest weight seen so far. ``λ = 0`` never skips (the candidate
  pattern's exact attention).

The rule depends on the order the candidates are visited in; every implementation follows
one order (:func:`visiting_order`): the list entries the causal/bounds rule cuts (the
diagonal blocks, the sequence tail) first, then the whole entries in ascending order (the
attention-sink block first). The precise rule, with its tie and corner cases, is
:mod:`sparse_attn.backends.blasst_reference`'s; :mod:`sparse_attn.backends.triton_blasst` is
the kernel.

Backends (:func:`resolve_skip_backend`). ``auto`` on CUDA and ``triton`` run the skipping
Triton kernel where it takes the case, ``gluon`` and ``flash4`` asked for by name also run it
(one warning: they have no skip rule); ``reference`` runs the rule in PyTorch (the oracle, and
the path on CPU); ``flex`` has no skip rule and runs the reference (one warning). The kernel is
forward-only: inputs that require grad run on the reference rule, which autograd
differentiates (skipped blocks get no gradient), with one warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .checks import check_fraction
from .geometry import own_kv_block_span
from .pattern import BlockSparsePattern

__all__ = [
    "SkipThresholdPattern",
    "computed_density",
    "resolve_skip_backend",
    "skip_threshold_attention",
    "visiting_order",
    "with_threshold",
]

_KERNEL_BACKENDS = ("auto", "triton", "gluon", "flash4")


@dataclass(frozen=True, eq=False, repr=False)
class SkipThresholdPattern(BlockSparsePattern):
    """Candidate block lists plus the in-kernel skip threshold ``λ`` (see the module docstring)."""

    skip_threshold: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("skip_threshold", self.skip_threshold, open_low=False)
        object.__setattr__(self, "skip_threshold", float(self.skip_threshold))

    @classmethod
    def over(cls, candidates: BlockSparsePattern, skip_threshold: float) -> SkipThresholdPattern:
        """``candidates``' lists with the skip threshold; keeps their validation results. A pattern
        with a token rule or a layout (:class:`~sparse_attn.masked_pattern.MaskedPattern`) is refused:
        the skipping kernel computes plain blocks in the caller's order."""
        if not isinstance(candidates, BlockSparsePattern):
            raise TypeError(f"candidates must be a BlockSparsePattern, got {type(candidates).__name__}")
        if getattr(candidates, "token_rule", None) is not None or getattr(candidates, "layout", None) is not None:
            raise ValueError(
                "the skip-threshold candidates must be plain block lists: a pattern with a token rule or a "
                "layout cannot be skipped through"
            )
        return cls._same_lists(candidates, skip_threshold=skip_threshold)

    def candidates(self) -> BlockSparsePattern:
        """The plain candidate pattern (every listed block computed)."""
        return BlockSparsePattern._same_lists(self)

    def union(self, other: BlockSparsePattern, *, causal: bool = True) -> BlockSparsePattern:
        raise TypeError(
            "union is not defined for a SkipThresholdPattern (which blocks run is decided inside the kernel); "
            "combine the candidate patterns (pattern.candidates()) instead"
        )

    def __repr__(self) -> str:
        return f"SkipThreshold{super().__repr__()[:-1]}, skip_threshold={self.skip_threshold:g})"


def visiting_order(kv_counts: torch.Tensor, full_counts: torch.Tensor, max_kv: int) -> torch.Tensor:
    """Int64 ``(..., max_kv)``: for each visiting step, the list slot a query block visits.

    Lists hold their full entries first (:class:`sparse_attn.plan.BlockSparsePlan`), so a
    query block with ``n`` entries of which ``f`` are full visits slots ``f .. n-1`` (the
    partial entries: causal diagonal, sequence tail), then ``0 .. f-1``. Steps at or past ``n``
    map to slot ``step`` (unused, never read)."""
    steps = torch.arange(max_kv, device=kv_counts.device)
    counts, full = kv_counts[..., None].long(), full_counts[..., None].long()
    partial = counts - full
    slot = torch.where(steps < partial, steps + full, steps - partial)
    return torch.where(steps < counts, slot, steps)


def computed_density(pattern: SkipThresholdPattern, computed: torch.Tensor, *, causal: bool) -> float:
    """Blocks actually computed (``computed``, int32 ``(B, Hq, n_q_blocks)`` from the kernel or the
    reference) over the valid blocks, as :meth:`BlockSparsePattern.density` counts them."""
    if causal:  # per query block, the KV blocks up to the one holding its last position
        _, last = own_kv_block_span(pattern.seq_q, pattern.seq_k, pattern.block_q, pattern.block_k)
        valid = int((last + 1).sum())
    else:
        valid = pattern.num_q_blocks * pattern.num_kv_blocks
    return float(computed.sum(dtype=torch.int64)) / (valid * computed.shape[0] * computed.shape[1])


def resolve_skip_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: SkipThresholdPattern
) -> str:
    """``"triton"`` (the skipping kernel, :mod:`.backends.triton_blasst`) or ``"reference"`` (the
    rule in PyTorch, :mod:`.backends.blasst_reference`) for this case; warns once per reason when
    a backend asked for by name cannot run it (see the module docstring)."""
    from .backends import resolve_own_kernel

    return resolve_own_kernel(
        backend, q, k, v, pattern, kernel="triton_blasst",
        lacks="has no in-kernel skip rule for a skip-threshold (blasst) pattern",
        kernel_label="the triton skipping kernel", reference_label="the reference skip rule", return_lse=False,
    )  # fmt: skip


def skip_threshold_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: SkipThresholdPattern,
    *,
    causal: bool,
    scale: float,
    backend: str,
    return_lse: bool = False,
    return_computed: bool = False,
):
    """Attention over ``pattern``'s candidates with the skip rule, on the backend
    :func:`resolve_skip_backend` picks. Checked inputs as in :func:`sparse_attn.block_sparse_attention`.

    Returns ``out``, then ``lse`` with ``return_lse``, then with ``return_computed`` the int32
    ``(B, Hq, n_q_blocks)`` count of blocks each query block computed (candidates minus skipped)."""
    name = resolve_skip_backend(backend, q, k, v, pattern)
    if name == "triton":
        from .backends import triton_blasst as module
    else:
        from .backends import blasst_reference as module
    out, lse, computed = module.forward(q, k, v, pattern, causal=causal, scale=scale, return_lse=return_lse)
    results = (out,) + ((lse,) if return_lse else ()) + ((computed,) if return_computed else ())
    return results[0] if len(results) == 1 else results


def with_threshold(pattern: SkipThresholdPattern, skip_threshold: float) -> SkipThresholdPattern:
    """The same candidates with another threshold (keeps validation results and plans)."""
    check_fraction("skip_threshold", skip_threshold, open_low=False)
    return dataclasses.replace(pattern, skip_threshold=float(skip_threshold), _cache=pattern._cache)
