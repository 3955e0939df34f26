"""Token rules the block kernels evaluate arithmetically: box predicates over packed per-token fields.

A token rule (:mod:`sparse_attn.masked_pattern`) is defined by ``allowed(q_pos, k_pos)``. The
Triton kernels can read any rule as per-block bitmasks (:func:`sparse_attn.plan.rule_bitmask`),
but those are ``block_q * block_k / 8`` bytes per cut block, built once on the host side and
gathered per score inside the kernel. Many spatial rules are *boxes*: every key carries a few
small integer fields (grid coordinates, dilation residues) and every query a range per field,
and the pair is allowed when each key field lies in the query's range; some keys (text tokens)
are seen by every query. Such a rule can offer a :class:`BoxPredicate` (a method
``kernel_predicate()`` returning one, or ``None`` when its fields do not fit), which the kernels
evaluate from three int32 values per token, in the spirit of FlexAttention's compiled
``mask_mod``: no per-block table at all.

Packing (one int32 per token and role). Field ``f`` of width ``w_f`` bits holds values in
``[0, 2**(w_f - 1))``; its top bit is a *guard*. The key code is ``sum(x_f << o_f)`` (``-1`` for a
key every query sees), a query's ``low`` / ``high`` are its inclusive range bounds packed the
same way, and ``guard = sum(1 << (o_f + w_f - 1))``. Then, per field, ``((code | guard) - low)``
keeps its guard bit exactly when ``x_f >= low_f`` and ``((high | guard) - code)`` exactly when
``x_f <= high_f`` (each field's difference lies in ``[1, 2**w_f)``, so no borrow crosses fields),
and::

    allowed = (((code | guard) - low) & ((high | guard) - code) & guard) == guard  or  code < 0

The kernels fold the ``code < 0`` keys and the keys past the sequence's end into two per-key
values (:func:`box_visible`): ``keep`` is ``guard`` (``0`` for a key every query sees) and
``want`` is ``keep`` (``guard | 1`` past the end: bit 0 is never a guard bit, so no pair
matches), and a pair is visible when ``(lower & upper & keep) == want``: two subtractions, two
ands and one comparison per score, whatever the key, with no separate bounds mask. The fields
must fit in 31 bits together.

Group summaries (which steps a kernel may skip). Per group of :data:`GROUP` consecutive positions
the predicate also keeps four packed values: the queries' per-field lowest lower bound and highest
upper bound, and the keys' per-field lowest and highest values (a text key counts as the whole
range of every field, a query that sees every key as the whole range; positions past the table's
end count as nothing). A query group may see a key group only if, in every field, the two ranges
meet, which is the same guard-bit test on the summaries::

    may_see = (((key_max | guard) - query_low) & ((query_high | guard) - key_min) & guard) == guard

It never says "no" for a pair of groups that holds an allowed pair (:func:`groups_may_see`,
tested on every pair of groups); where it says "no", every score of that (query group, key
group) tile is masked and a kernel that skips the tile can compute the same result bit for bit
(an all-masked step leaves the sum and the accumulator as they are, and the running maximum too
except where a row has seen nothing yet: the Gluon forward sets that one as the step would).
With ``neighborhood``'s defaults (7 x 7 x 7 windows, 128-token blocks, the chosen (8, 4, 4) tile)
the summaries rule out 27.8 % of a 64-row warpgroup's 128-key steps over the cut entries at
HunyuanVideo's 30 x 48 x 80 + 256 text tokens and 32.7 % at Wan 2.1's 21 x 45 x 80 (44 % and
48 % of 64-key steps; :func:`sparse_attn.plan.unseen_steps`, counted on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["BoxPredicate", "box_allowed", "box_visible", "groups_may_see", "kernel_predicate", "pack_box"]

# Field widths (value bits + guard) must sum to at most this, so codes stay non-negative in int32.
MAX_BITS = 31

# Positions per group summary (module docstring): a warpgroup's 64 query rows, a 64-key step.
GROUP = 64


@dataclass(frozen=True)
class BoxPredicate:
    """A token rule as packed per-token fields (see the module docstring).

    ``words``: int32, flat: the token table's ``3 * S`` values, then the group summaries (module
    docstring) as 4 rows of :func:`num_groups` values (query lowest lower bounds, query highest
    upper bounds, key lowest values, key highest values; groups wholly past the end count as
    nothing): the layout the kernels read. ``seq_len``: ``S``.
    ``table`` (a view of the start of ``words``): int32 ``(3, S)`` over the pattern's key
    positions: row 0 the key codes (``-1``: seen by every query), rows 1 and 2 the packed
    inclusive lower and upper bounds of the query at that position (queries are indexed by their
    key-space position, ``seq_k - seq_q + row``).
    ``guard``: the guard bits of every field.
    """

    words: torch.Tensor
    guard: int
    seq_len: int

    @property
    def table(self) -> torch.Tensor:
        return self.words[: 3 * self.seq_len].view(3, self.seq_len)

    @property
    def groups(self) -> torch.Tensor:
        """The group summaries, int32 ``(4, num_groups(S))`` (a view of ``words``)."""
        return self.words[3 * self.seq_len :].view(4, num_groups(self.seq_len))

    def to(self, device) -> BoxPredicate:
        return BoxPredicate(self.words.to(device), self.guard, self.seq_len)


def num_groups(seq_len: int) -> int:
    """Group summaries per row of :attr:`BoxPredicate.words`: every group a position falls in, and
    one past the end (a kernel's 128-key step over the last block reads two groups)."""
    return seq_len // GROUP + 2


def pack_box(
    key_fields: list[torch.Tensor],
    low_fields: list[torch.Tensor],
    high_fields: list[torch.Tensor],
    maxima: list[int],
    *,
    key_always: torch.Tensor,
    query_all: torch.Tensor,
) -> BoxPredicate | None:
    """Pack per-token fields into a :class:`BoxPredicate`, or ``None`` when they need more than 31 bits.

    ``key_fields[f]``, ``low_fields[f]``, ``high_fields[f]``: int64 ``(S,)`` values of field ``f`` for
    each key, and each query's inclusive range (a range with ``low > high`` is empty: that query
    sees no key through the box); ``maxima[f]``: the largest value field ``f`` may take (key values
    and bounds are clamped to ``[0, maxima[f]]``, which keeps the rule: keys never lie outside
    that range). ``key_always``: bool ``(S,)``, keys every query sees; ``query_all``: bool ``(S,)``,
    queries that see every key.
    """
    widths = [max(int(m), 1).bit_length() + 1 for m in maxima]
    if sum(widths) > MAX_BITS:
        return None
    device = key_always.device
    seq_len = key_always.shape[0]
    code = torch.zeros(key_always.shape, dtype=torch.int64, device=device)
    low, high = torch.zeros_like(code), torch.zeros_like(code)
    # Group summaries (module docstring), packed like the tokens' values.
    summaries = torch.zeros(4, num_groups(seq_len), dtype=torch.int64, device=device)
    guard = 0
    offset = 0
    for key, lo, hi, top, width in zip(key_fields, low_fields, high_fields, maxima, widths, strict=True):
        empty = hi < lo
        full = (1 << (width - 1)) - 1  # the field's largest value: a range that admits every key
        top = max(int(top), 1)
        lo_value = torch.where(empty, 1, lo.clamp(0, top))
        hi_value = torch.where(empty, 0, hi.clamp(0, top))
        lo_value = torch.where(query_all, 0, lo_value)
        hi_value = torch.where(query_all, full, hi_value)
        key_value = key.clamp(0, top)
        code |= key_value << offset
        low |= lo_value << offset
        high |= hi_value << offset
        # Per group: the lowest / highest of each role's values; padding is the neutral value
        # (full for a minimum, 0 for a maximum), so groups past the end summarise nothing.
        lowest = (lo_value, torch.where(key_always, 0, key_value))
        highest = (hi_value, torch.where(key_always, full, key_value))
        for row, values in ((0, lowest[0]), (2, lowest[1])):
            summaries[row] |= _per_group(values, full, torch.amin) << offset
        for row, values in ((1, highest[0]), (3, highest[1])):
            summaries[row] |= _per_group(values, 0, torch.amax) << offset
        guard |= 1 << (offset + width - 1)
        offset += width
    code = torch.where(key_always, -1, code)
    words = torch.cat([torch.stack([code, low, high]).reshape(-1), summaries.reshape(-1)])
    return BoxPredicate(words.to(torch.int32).contiguous(), guard, seq_len)


def _per_group(values: torch.Tensor, neutral: int, reduce) -> torch.Tensor:
    """``reduce`` over each :data:`GROUP` positions of ``values``, padded with ``neutral`` to
    :func:`num_groups` groups."""
    groups = num_groups(values.shape[0])
    padded = torch.nn.functional.pad(values, (0, groups * GROUP - values.shape[0]), value=neutral)
    return reduce(padded.view(groups, GROUP), dim=1)


def groups_may_see(predicate: BoxPredicate, query_groups: torch.Tensor, key_groups: torch.Tensor) -> torch.Tensor:
    """The kernels' skip test in PyTorch (broadcasting int64 group indices): ``False`` where no
    query of group ``query_groups`` may see a key of group ``key_groups`` (module docstring)."""
    summaries = predicate.groups.long()
    query_low, query_high = summaries[0][query_groups], summaries[1][query_groups]
    key_min, key_max = summaries[2][key_groups], summaries[3][key_groups]
    guard = predicate.guard
    return (((key_max | guard) - query_low) & ((query_high | guard) - key_min) & guard) == guard


def box_allowed(predicate: BoxPredicate, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """The predicate in PyTorch (broadcasting int64 positions, clamped into the table): the
    kernels' arithmetic, and the test oracle against ``allowed``."""
    last = predicate.table.shape[1] - 1
    table = predicate.table.long()
    code = table[0][k_pos.clamp(0, last)]
    low, high = table[1][q_pos.clamp(0, last)], table[2][q_pos.clamp(0, last)]
    guard = predicate.guard
    inside = (((code | guard) - low) & ((high | guard) - code) & guard) == guard
    return inside | (code < 0)


def box_visible(predicate: BoxPredicate, q_pos: torch.Tensor, k_pos: torch.Tensor, seq_k: int) -> torch.Tensor:
    """The kernels' fused test (module docstring) in PyTorch, with their 32-bit wrap-around: the
    pair is allowed by the predicate and its key lies before ``seq_k``. Keys at or past ``seq_k``
    read code 0 (any value would do: ``want`` rejects them). The oracle of the kernels' formulation."""
    last = predicate.table.shape[1] - 1
    table = predicate.table.long()
    in_range = k_pos < seq_k
    code = torch.where(in_range, table[0][k_pos.clamp(0, last)], 0)
    low, high = table[1][q_pos.clamp(0, last)], table[2][q_pos.clamp(0, last)]
    guard, bits = predicate.guard, 0xFFFFFFFF
    keep = torch.where(code < 0, 0, guard)
    want = torch.where(in_range, keep, guard | 1)
    # A key every query sees has code -1, so its differences wrap; keep = 0 ignores them.
    lower = ((code | guard) - low) & bits
    upper = ((high | guard) - code) & bits
    return (lower & upper & keep) == want


def kernel_predicate(pattern) -> BoxPredicate | None:
    """The pattern's token rule as a :class:`BoxPredicate` on the pattern's device, or ``None``
    (no rule, a rule without ``kernel_predicate``, or fields that do not fit); cached on the pattern."""
    rule = getattr(pattern, "token_rule", None)
    if rule is None or not callable(getattr(rule, "kernel_predicate", None)):
        return None
    cached = pattern.cached_plan("rule_predicate")
    if cached is None:
        predicate = rule.kernel_predicate()
        if predicate is not None and predicate.table.shape[1] != pattern.seq_k:
            predicate = None  # a table for another sequence cannot index this pattern's positions
        cached = pattern.store_plan("rule_predicate", (predicate.to(pattern.device) if predicate else None,))
    return cached[0]
