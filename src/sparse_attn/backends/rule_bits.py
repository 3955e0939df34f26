"""Token rules as the block kernels read them: per-block bitmasks, or a box predicate.

A pattern with a token rule (:class:`sparse_attn.masked_pattern.MaskedPattern`) has, per list
entry the rule cuts, a ``(block_q, block_k)`` mask packed into int32 words at plan time
(:func:`sparse_attn.plan.rule_bitmask`): row ``r`` of entry ``e`` is ``ceil(block_k / 32)``
words from ``words[e, r, 0]``, key ``c`` of the block in bit ``c % 32`` of word ``c // 32``.
Kernels load the entry's index (``-1``: the rule does not cut it) beside its KV block number
and call :func:`rule_allowed` on the tile's block-relative rows and keys.

A rule with a box predicate (:mod:`sparse_attn.rule_predicate`) needs no bitmask: the forward
kernels load each row's packed bounds once (:func:`box_bounds`) and each key tile's codes, and
:func:`box_visible` evaluates the pair test arithmetically, the sequence's end included.
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
    def box_key_terms(BoxTable, seq_k, key_pos, guard):
        """Per key of a tile: its code, and the ``keep`` / ``want`` values of the fused test
        (:func:`sparse_attn.rule_predicate.box_visible`): keys every query sees keep no guard
        bit, keys at or past ``seq_k`` want an impossible value."""
        in_range = key_pos < seq_k
        code = tl.load(BoxTable + key_pos, mask=in_range, other=0)
        keep = tl.where(code < 0, 0, guard)
        want = tl.where(in_range, keep, guard | 1)
        return code, keep, want

    @triton.jit
    def box_match(code, keep, want, low, high, guard):
        """The fused test on operands already laid out against each other (per key ``code`` /
        ``keep`` / ``want``, per query row ``low`` / ``high``, broadcast either way round)."""
        return (((code | guard) - low) & ((high | guard) - code) & keep) == want

    @triton.jit
    def box_visible(BoxTable, seq_k, key_pos, low, high, guard):
        """Bool ``(rows, keys)``: the box predicate allows the pair and the key lies before
        ``seq_k`` (no separate bounds mask needed); five integer operations per pair."""
        code, keep, want = box_key_terms(BoxTable, seq_k, key_pos, guard)
        return box_match(code[None, :], keep[None, :], want[None, :], low[:, None], high[:, None], guard)
