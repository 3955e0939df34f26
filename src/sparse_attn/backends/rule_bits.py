"""Token rules as the block kernels read them: per-block bitmasks, or a box predicate (forward only).

A pattern with a token rule (:class:`sparse_attn.masked_pattern.MaskedPattern`) has, per list
entry the rule cuts, a ``(block_q, block_k)`` mask packed into int32 words at plan time
(:func:`sparse_attn.plan.rule_bitmask`): row ``r`` of entry ``e`` is ``ceil(block_k / 32)``
words from ``words[e, r, 0]``, key ``c`` of the block in bit ``c % 32`` of word ``c // 32``.
Kernels load the entry's index (``-1``: the rule does not cut it) beside its KV block number
and call :func:`rule_allowed` on the tile's block-relative rows and keys.

A rule with a box predicate (:mod:`sparse_attn.rule_predicate`) needs no bitmask: the forward
kernels load each row's packed bounds once (:func:`box_bounds`) and each key tile's codes, and
:func:`box_allowed` evaluates the pair test arithmetically.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None

if triton is not None:

    @triton.jit
    def rule_allowed(RuleWords, entry, rows, keys, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
        """Bool, the broadcast shape of ``rows`` and ``keys`` (positions inside the entry's
        query and KV block): the token rule allows the pair. All true for ``entry < 0``: the
        load is predicated off and every bit reads as set, so no branch enters the loop."""
        WORDS: tl.constexpr = (BLOCK_K + 31) // 32
        pointers = RuleWords + entry.to(tl.int64) * (BLOCK_Q * WORDS) + rows * WORDS + (keys >> 5)
        words = tl.load(pointers, mask=entry >= 0, other=-1)
        return ((words >> (keys & 31)) & 1) != 0

    @triton.jit
    def box_bounds(BoxTable, seq_k, query_pos, in_range):
        """The packed inclusive lower and upper bounds of each query row (rows 1 and 2 of the
        ``(3, seq_k)`` table, at the rows' key-space positions)."""
        low = tl.load(BoxTable + seq_k + query_pos, mask=in_range, other=0)
        high = tl.load(BoxTable + 2 * seq_k + query_pos, mask=in_range, other=0)
        return low, high

    @triton.jit
    def box_allowed(BoxTable, seq_k, key_pos, low, high, guard):
        """Bool ``(rows, keys)``: the box predicate allows the pair (keys past ``seq_k`` read as
        always-seen; the bounds mask hides them)."""
        code = tl.load(BoxTable + key_pos, mask=key_pos < seq_k, other=-1)
        inside = (((code[None, :] | guard) - low[:, None]) & ((high[:, None] | guard) - code[None, :]) & guard) == guard
        return inside | (code < 0)[None, :]
