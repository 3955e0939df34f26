"""Sort-free row selection in Triton (reference: the sort-based rules of :mod:`.naive`).

Two rules:

* :func:`cumulative_mass_mask_triton`: the fewest highest entries whose sum reaches ``threshold``
  of the row's sum, the count clamped to ``[minimum, maximum]``;
* :func:`topk_by_rank_mask_triton`: the ``keep_count[row]`` entries ranked highest.

Both search the entries' order-preserving integer keys (a float's bits, negative floats
reflected) instead of sorting. For the mass rule, the value ``v`` of the last kept entry is
the smallest key whose strictly-larger entries sum to less than the target; the count is the
entries above ``v`` plus as many entries equal to ``v`` as keep their preceding mass short of
the target (``ceil((target - mass above v) / v)`` of them, at most all). The selection then
keeps the entries above the count's cut and the first ties by index, which is exactly the
reference's stable-sort order.

Rows of up to :data:`MAX_ROW` entries: one program per row holds the row in registers and
bisects. (When the mass rule's count is its own, not clamped by the budget, and takes a tie at
``v``, that cut is ``v`` itself and the second bisection, the one that finds the cut, is
skipped.)

Longer rows (FlexPrefill's line masses and flattened block tables at long context; up to
``2**30`` entries) take a radix select over the keys, most significant digit first, with no
sort and O(rows x chunks x bins) scratch:

* Launches: one per digit of :data:`LONG_DIGIT_BITS` bits (8 for the default 4 bits, 16 bins)
  and one that writes the mask; each over a 1-D grid of ``rows x chunks`` programs, a chunk
  being at least :data:`LONG_CHUNK` entries and a row at most :data:`LONG_MAX_CHUNKS` chunks
  (so rows of 128K entries run 16 programs each, rows of 1M entries 128 of 8K entries, and a
  head's flattened 8192 x 8192 block table at 1M tokens 512 of 128K entries: 64 chunks a row
  left that table's launches on 64 programs, 270 ms of FlexPrefill's 470 ms at 1M tokens).
* A program first decides its row's previous digit from that digit's per-chunk partials: it
  reduces the ``(chunks, bins)`` table over chunks, then over the bins above each bin, in a
  fixed order (every program of the row computes the same decision from the same numbers; the
  row's first chunk stores the row's state for the next launch). For the mass rule the kept
  bin is the one holding ``v``: the lowest bin whose higher bins, added to the mass above the
  key prefix decided so far, leave the target unreached (and not below 0.0's key). The program
  then counts and sums, per bin of the next digit, its chunk's entries that share the new
  prefix, into the next ``(rows, chunks, bins)`` table. An entry's unsigned-order key xor the
  prefix, shifted down to the digit, is its bin (at least ``bins`` where it is off the prefix);
  lanes keep running sums over the chunk's tiles (``hit * x`` fused into one rounding) and the
  chunk's tiles holding no entry of the prefix, most of them past the first few digits, are
  skipped.
* The budget needs no second search: at the digit where the entries above the kept bin
  already reach ``maximum``, or all of them down to its end still fall short of ``minimum``,
  the count is fixed, and from there the row's search follows the cut of that count instead
  (a count histogram is exact). After the last digit the prefix is the cut's whole key, the
  count and mass above it are known, and the last table holds each chunk's ties at it: the
  mask launch keeps the first ``keep - above`` ties by index, each chunk offset by the ties of
  the chunks before it (an integer sum).
* Scratch: two (double-buffered) int32 and float32 ``(rows, chunks, bins)`` tables (at most
  32768 words a row) and six words of state a row, beside the uint8 output. No atomics: every
  run makes the same decisions.

Float sums are reduced in a different order than the reference's sequential scan of the sorted
row (a tree in the one-program kernel; per-lane running sums, a tree per chunk, a tree over
chunks and over bins here), and exact equality with every summation order is impossible, so a
row whose running mass lands within float rounding of the target may keep an entry (rarely a
few) more or fewer than the reference. The decision rule is otherwise the reference's: where
sums are exact (entries on a binary grid, e.g. quarters) both agree bit for bit, ties by index
included. Entries equal to 0.0 are never counted toward the mass (only the budget's minimum
keeps them), as in the reference for thresholds of at most 1. Masses are finite and
non-negative.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import device_unsupported_reason

__all__ = [
    "LONG_CHUNK",
    "LONG_DIGIT_BITS",
    "LONG_MAX_CHUNKS",
    "LONG_TILE",
    "LONG_WARPS",
    "MAX_ROW",
    "cumulative_mass_mask_triton",
    "topk_by_rank_mask_triton",
    "unsupported_reason",
]

# Longest row one program holds (float32 entries in registers); longer rows take the radix select.
MAX_ROW = 8192
# Radix select of long rows: key bits resolved per launch (2**LONG_DIGIT_BITS bins a digit), entries a
# program reads per step, fewest entries a program takes, most programs a row, warps a program.
LONG_DIGIT_BITS = 4
LONG_TILE = 512
LONG_CHUNK = 8192
LONG_MAX_CHUNKS = 512
LONG_WARPS = 8
# Longest row: entry indices (and a tile past the row's end) are int32.
_LONGEST_ROW = 2**30
# Output allocator; tests replace it to poison outputs so unwritten entries show.
_empty = torch.empty


def unsupported_reason(scores: torch.Tensor) -> str | None:
    """Why the selection kernel cannot take these rows, or ``None``."""
    reason = device_unsupported_reason(scores)
    if reason is not None:
        return reason
    if scores.dim() < 1 or scores.numel() == 0:
        return "needs at least one non-empty row"
    if scores.shape[-1] > _LONGEST_ROW:
        return f"takes rows of at most {_LONGEST_ROW} entries, got {scores.shape[-1]}"
    return None


@triton.jit
def _order_keys(x):
    """int32 keys ordered as the float32 values (negative floats' bits reflected)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _select_row(
    Scores,
    KeepCount,
    Out,
    n,
    threshold,
    minimum,
    maximum,
    MASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    x = tl.load(Scores + row * n + offs, mask=valid, other=0.0)
    x = tl.where(x == 0.0, 0.0, x)  # -0.0 ties with +0.0, as in a sort
    keys = tl.where(valid, _order_keys(x), -2147483647 - 1).to(tl.int64)
    lowest = tl.min(tl.where(valid, keys, 2147483647), 0)
    highest = tl.max(keys, 0)

    if MASS:
        # Entries are masses (non-negative). keep = the entries reached before the running
        # mass, highest first, gets to threshold x total.
        x = tl.where(valid, x, 0.0)
        target = threshold * tl.sum(x, 0)
        # Smallest key v with sum(x[key > v]) < target (bisection over [lowest, highest]).
        lo = lowest
        hi = highest
        for _ in range(34):
            mid = lo + (hi - lo) // 2
            above = tl.sum(tl.where(keys > mid, x, 0.0), 0)
            short = above < target
            hi = tl.where(short & (lo < hi), mid, hi)
            lo = tl.where(short | (lo >= hi), lo, mid + 1)
        cut = lo
        greater = keys > cut
        mass_above = tl.sum(tl.where(greater, x, 0.0), 0)
        count_above = tl.sum(greater.to(tl.int32), 0)
        ties = tl.sum((valid & (keys == cut)).to(tl.int32), 0)
        value = tl.max(tl.where(keys == cut, x, 0.0), 0)
        # Ties (in index order) are kept while their preceding mass is short of the target.
        needed = tl.where(value > 0, tl.math.ceil((target - mass_above) / tl.where(value > 0, value, 1.0)), 0.0)
        tie_count = tl.minimum(tl.maximum(needed, 0.0), ties.to(tl.float32)).to(tl.int32)
        unclamped = tl.where(target > 0, count_above + tie_count, 0)
        keep = tl.maximum(unclamped, minimum)
        if maximum >= 0:
            keep = tl.minimum(keep, maximum)
        # When the count is the mass rule's own (not clamped) and takes at least one tie at
        # `cut`, `cut` is already the smallest key with fewer than `keep` entries above it (the
        # entries above it are fewer; one key lower, the ties alone make `keep`): the second
        # bisection would return it, so it is skipped.
        search = (keep != unclamped) | (tie_count == 0)
    else:
        keep = tl.load(KeepCount + row).to(tl.int32)
        cut = lowest - 1  # the compiler needs `cut` defined before the bisection below assigns it
        search = True

    if search:
        # Smallest key u with fewer than `keep` entries above it (bisection over [lowest - 1,
        # highest]): every entry above u is kept, then the first ties at u by index.
        lo = lowest - 1
        hi = highest
        for _ in range(34):
            mid = lo + (hi - lo) // 2
            above = tl.sum((keys > mid).to(tl.int32), 0)
            few = above < keep
            hi = tl.where(few & (lo < hi), mid, hi)
            lo = tl.where(few | (lo >= hi), lo, mid + 1)
        cut = lo
    greater = valid & (keys > cut)
    tie = valid & (keys == cut)
    tie_rank = tl.cumsum(tie.to(tl.int32), 0)
    count_above = tl.sum(greater.to(tl.int32), 0)
    selected = (greater | (tie & (tie_rank <= keep - count_above))) & (keep > 0)
    tl.store(Out + row * n + offs, selected.to(tl.uint8), mask=valid)


@triton.jit
def _radix_decide(
    MassIn,
    CountIn,
    StateIn,
    StateMassIn,
    KeepCount,
    row,
    chunks,
    threshold,
    minimum,
    maximum,
    shift,
    digit_mask,
    high_mask,
    MASS: tl.constexpr,
    ROOT: tl.constexpr,
    BINS: tl.constexpr,
    CHUNKS: tl.constexpr,
):
    """The row's digit at ``shift`` from the previous launch's per-chunk partials; returns the row's state.

    State: the key prefix decided so far (unsigned-order bits), the count and the mass of the
    entries above it, whether the search still follows the mass rule (else the cut of ``goal``
    entries), the goal, the target mass, and the decided bin with its count (at the last
    digit: the ties at the cut). Every program of the row computes the same numbers.
    """
    chunk_ids = tl.arange(0, CHUNKS)
    bins = tl.arange(0, BINS)
    offsets = (row * chunks + chunk_ids[:, None]) * BINS + bins[None, :]
    present = chunk_ids[:, None] < chunks
    counts = tl.sum(tl.load(CountIn + offsets, mask=present, other=0), 0)
    higher = bins[None, :] > bins[:, None]  # [bin, other bin]: the other bin is higher
    counts_higher = tl.sum(tl.where(higher, counts[None, :], 0), 1)
    if MASS:
        masses = tl.sum(tl.load(MassIn + offsets, mask=present, other=0.0), 0)
    else:
        masses = tl.zeros([BINS], tl.float32)
    masses_higher = tl.sum(tl.where(higher, masses[None, :], 0.0), 1)
    if ROOT:
        prefix = tl.zeros([], tl.int32)
        count_above = tl.zeros([], tl.int32)
        mass_above = tl.zeros([], tl.float32)
        if MASS:
            target = threshold * tl.sum(masses, 0)
            # No mass to reach: the count is the budget's minimum (clamped by its maximum on the host).
            by_mass = target > 0
            goal = tl.zeros([], tl.int32) + minimum
        else:
            target = tl.zeros([], tl.float32)
            by_mass = target > 0
            goal = tl.load(KeepCount + row)
    else:
        prefix = tl.load(StateIn + row * 4)
        count_above = tl.load(StateIn + row * 4 + 1)
        by_mass = tl.load(StateIn + row * 4 + 2) != 0
        goal = tl.load(StateIn + row * 4 + 3)
        mass_above = tl.load(StateMassIn + row * 2)
        target = tl.load(StateMassIn + row * 2 + 1)
    counts_above = count_above + counts_higher
    masses_above = mass_above + masses_higher

    # Mass rule: the lowest bin whose higher bins leave the running mass short of the target, and
    # not below the bin of 0.0's key (zeros are never counted toward the mass).
    zero_key = -2147483647 - 1
    floor = tl.where((zero_key & high_mask) == prefix, (zero_key >> shift) & digit_mask, 0)
    by_mass_bin = tl.maximum(tl.min(tl.where(masses_above < target, bins, digit_mask), 0), floor)
    at_mass_bin = bins == by_mass_bin
    mass_count_above = tl.sum(tl.where(at_mass_bin, counts_above, 0), 0)
    mass_count_through = mass_count_above + tl.sum(tl.where(at_mass_bin, counts, 0), 0)
    # The budget decides once the count is bound past it: the entries above the bin already reach
    # the maximum, or all down to the bin's end stay short of the minimum.
    to_maximum = by_mass & (maximum >= 0) & (mass_count_above >= maximum)
    to_minimum = by_mass & (mass_count_through < minimum) & ~to_maximum
    goal = tl.where(to_maximum, maximum, tl.where(to_minimum, minimum, goal))
    by_mass = by_mass & ~(to_maximum | to_minimum)
    # Cut of `goal` entries: the lowest bin with fewer than `goal` entries above its end.
    by_count_bin = tl.min(tl.where(counts_above < goal, bins, digit_mask), 0)

    chosen = tl.where(by_mass, by_mass_bin, by_count_bin)
    at_chosen = bins == chosen
    prefix = prefix | (chosen << shift)
    count_above = tl.sum(tl.where(at_chosen, counts_above, 0), 0)
    mass_above = tl.sum(tl.where(at_chosen, masses_above, 0.0), 0)
    ties = tl.sum(tl.where(at_chosen, counts, 0), 0)
    return prefix, count_above, mass_above, by_mass, goal, target, chosen, ties


@triton.jit
def _radix_round(
    Scores,
    KeepCount,
    MassIn,
    CountIn,
    StateIn,
    StateMassIn,
    MassOut,
    CountOut,
    StateOut,
    StateMassOut,
    Out,
    n,
    chunk_len,
    chunks,
    threshold,
    minimum,
    maximum,
    decided_shift,
    decided_digit_mask,
    decided_high_mask,
    shift,
    MASS: tl.constexpr,
    FIRST: tl.constexpr,
    ROOT: tl.constexpr,
    FINAL: tl.constexpr,
    BINS: tl.constexpr,
    CHUNKS: tl.constexpr,
    TILE: tl.constexpr,
):
    """One launch of the long-row radix select: decide the previous digit, then histogram the next one
    (or, ``FINAL``, write the mask). Program ``row * chunks + chunk`` takes entries
    ``[chunk * chunk_len, (chunk + 1) * chunk_len)`` of its row."""
    program = tl.program_id(0)
    row = (program // chunks).to(tl.int64)
    chunk = program % chunks
    start = chunk * chunk_len
    end = tl.minimum(start + chunk_len, n)
    row_scores = Scores + row * n
    if FIRST:
        prefix = tl.zeros([], tl.int32)
        count_above = tl.zeros([], tl.int32)
        mass_above = tl.zeros([], tl.float32)
        by_mass = prefix == 0
        goal = tl.zeros([], tl.int32)
        target = tl.zeros([], tl.float32)
        chosen = tl.zeros([], tl.int32)
        ties = tl.zeros([], tl.int32)
    else:
        prefix, count_above, mass_above, by_mass, goal, target, chosen, ties = _radix_decide(
            MassIn,
            CountIn,
            StateIn,
            StateMassIn,
            KeepCount,
            row,
            chunks,
            threshold,
            minimum,
            maximum,
            decided_shift,
            decided_digit_mask,
            decided_high_mask,
            MASS,
            ROOT,
            BINS,
            CHUNKS,
        )

    if FINAL:
        # The prefix is the cut's whole key. Mass rule: the ties at the cut its preceding mass
        # takes (the budget has already moved the search to a count cut where it binds).
        value = (prefix ^ (-2147483647 - 1)).to(tl.float32, bitcast=True)
        positive = value > 0
        needed = tl.where(positive, tl.math.ceil((target - mass_above) / tl.where(positive, value, 1.0)), 0.0)
        tie_count = tl.minimum(tl.minimum(tl.maximum(needed, 0.0), 1073741824.0).to(tl.int32), ties)
        keep = tl.maximum(count_above + tie_count, minimum)
        keep = tl.where(maximum >= 0, tl.minimum(keep, maximum), keep)
        keep = tl.where(by_mass, keep, goal)
        # Ties are kept in index order: this chunk's first are preceded by the earlier chunks' ties.
        chunk_ids = tl.arange(0, CHUNKS)
        earlier = chunk_ids < chunk
        ties_before = tl.sum(tl.load(CountIn + (row * chunks + chunk_ids) * BINS + chosen, mask=earlier, other=0), 0)
        quota = keep - count_above - ties_before
        cut = prefix ^ (-2147483647 - 1)
        row_out = Out + row * n
        for tile_start in range(start, end, TILE):
            offsets = tile_start + tl.arange(0, TILE)
            valid = offsets < end
            x = tl.load(row_scores + offsets, mask=valid, other=0.0)
            keys = _order_keys(tl.where(x == 0.0, 0.0, x))
            tie = valid & (keys == cut)
            tie_rank = tl.cumsum(tie.to(tl.int32), 0)
            selected = (keys > cut) | (tie & (tie_rank <= quota))
            tl.store(row_out + offsets, (selected & (keep > 0)).to(tl.uint8), mask=valid)
            quota -= tl.sum(tie.to(tl.int32), 0)
    else:
        if not FIRST:
            state = StateOut + row * 4
            first_chunk = chunk == 0
            tl.store(state, prefix, mask=first_chunk)
            tl.store(state + 1, count_above, mask=first_chunk)
            tl.store(state + 2, by_mass.to(tl.int32), mask=first_chunk)
            tl.store(state + 3, goal, mask=first_chunk)
            tl.store(StateMassOut + row * 2, mass_above, mask=first_chunk)
            tl.store(StateMassOut + row * 2 + 1, target, mask=first_chunk)
        # Per bin of this digit: count (and mass) of the chunk's entries under the prefix. An
        # entry's unsigned-order key xor the prefix, shifted down to the digit, is its digit where
        # it shares the prefix and at least 2**width where not (the first digit has no prefix).
        relative = prefix ^ (-2147483647 - 1)  # order keys xor this: unsigned-order keys xor the prefix
        bins = tl.arange(0, BINS)[:, None]
        # Running sums per lane, reduced once at the end.
        lane_counts = tl.zeros([BINS, TILE], tl.float32)  # exact: at most 2**24 a lane
        lane_masses = tl.zeros([BINS, TILE], tl.float32)
        for tile_start in range(start, end, TILE):
            offsets = tile_start + tl.arange(0, TILE)
            valid = offsets < end
            x = tl.load(row_scores + offsets, mask=valid, other=0.0)
            keys = _order_keys(tl.where(x == 0.0, 0.0, x)) ^ relative
            digit = (keys.to(tl.uint32, bitcast=True) >> shift).to(tl.int32, bitcast=True)
            digit = tl.where(valid, digit, -1)
            # Most tiles of the later digits hold no entry under the prefix: they add nothing.
            if tl.max(((digit >= 0) & (digit < BINS)).to(tl.int32), 0) > 0:
                hit = tl.where(digit[None, :] == bins, 1.0, 0.0)
                lane_counts += hit
                if MASS:
                    if by_mass:
                        lane_masses += hit * x[None, :]  # one rounding: the product is exact
        partial = (row * chunks + chunk) * BINS + tl.arange(0, BINS)
        tl.store(CountOut + partial, tl.sum(lane_counts.to(tl.int32), 1))
        if MASS:
            tl.store(MassOut + partial, tl.sum(lane_masses, 1))


def _radix_digits(bits: int) -> list[tuple[int, int, int]]:
    """The key's digits from the top: ``(shift, digit_mask, high_mask)`` each.

    ``high_mask`` selects the bits above the digit (the prefix decided before it), as an int32
    bit pattern. The first digit takes what is left over when 32 is not a multiple of ``bits``
    (``bits`` from 1 to 8), so every later digit's bins are all ``2**bits`` of them.
    """
    count = -(-32 // bits)
    widths = [32 - bits * (count - 1)] + [bits] * (count - 1)
    digits, top = [], 32
    for width in widths:
        shift = top - width
        high = (~((1 << top) - 1)) & 0xFFFFFFFF
        digits.append((shift, (1 << width) - 1, high - (1 << 32) if high >= 1 << 31 else high))
        top = shift
    return digits


def _launch_long(
    flat: torch.Tensor, keep_count: torch.Tensor | None, *, threshold: float, minimum: int, maximum: int
) -> torch.Tensor:
    """The radix select over rows of ``flat`` (float32 ``(rows, n)``); uint8 mask ``(rows, n)``."""
    rows, n = flat.shape
    mass = keep_count is None
    if maximum >= 0:  # clamping up to the minimum, then down to the maximum, ends at the maximum
        minimum = min(minimum, maximum)
    chunk_len = max(LONG_CHUNK, triton.cdiv(n, LONG_MAX_CHUNKS))
    chunk_len = triton.cdiv(chunk_len, LONG_TILE) * LONG_TILE
    chunks = triton.cdiv(n, chunk_len)
    bins = 1 << LONG_DIGIT_BITS
    device = flat.device
    counts = torch.empty((2, rows, chunks, bins), dtype=torch.int32, device=device)
    masses = torch.empty((2, rows, chunks, bins) if mass else (2, 1), dtype=torch.float32, device=device)
    state = torch.empty((2, rows, 4), dtype=torch.int32, device=device)
    state_mass = torch.empty((2, rows, 2), dtype=torch.float32, device=device)
    keep = counts if keep_count is None else keep_count  # unused by the mass rule
    out = _empty((rows, n), dtype=torch.uint8, device=device)
    digits = _radix_digits(LONG_DIGIT_BITS)
    for launch in range(len(digits) + 1):
        decided = digits[launch - 1] if launch > 0 else (0, 0, 0)
        shift = digits[launch][0] if launch < len(digits) else 0
        before, after = (launch + 1) % 2, launch % 2
        _radix_round[(rows * chunks,)](
            flat,
            keep,
            masses[before],
            counts[before],
            state[before],
            state_mass[before],
            masses[after],
            counts[after],
            state[after],
            state_mass[after],
            out,
            n,
            chunk_len,
            chunks,
            float(threshold),
            int(minimum),
            int(maximum),
            *decided,
            shift,
            MASS=mass,
            FIRST=launch == 0,
            ROOT=launch == 1,
            FINAL=launch == len(digits),
            BINS=bins,
            CHUNKS=max(2, triton.next_power_of_2(chunks)),
            TILE=LONG_TILE,
            num_warps=LONG_WARPS,
        )
    return out


def _launch(scores: torch.Tensor, keep_count: torch.Tensor | None, *, threshold: float, minimum: int, maximum: int):
    reason = unsupported_reason(scores)
    if reason is not None:
        raise ValueError(f"the Triton selection kernel cannot take these rows: {reason}")
    shape = scores.shape
    n = shape[-1]
    flat = scores.reshape(-1, n).float().contiguous()
    rows = flat.shape[0]
    counts = None if keep_count is None else keep_count.reshape(-1).to(torch.int32).contiguous()
    if n > MAX_ROW:
        out = _launch_long(flat, counts, threshold=threshold, minimum=minimum, maximum=maximum)
        return out.view(torch.bool).view(shape)
    out = _empty((rows, n), dtype=torch.uint8, device=scores.device)
    counts = flat if counts is None else counts  # unused by MASS
    block = max(16, triton.next_power_of_2(n))
    warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    _select_row[(rows,)](
        flat,
        counts,
        out,
        n,
        float(threshold),
        int(minimum),
        int(maximum),
        MASS=keep_count is None,
        BLOCK=block,
        num_warps=warps,
    )
    return out.view(torch.bool).view(shape)


def cumulative_mass_mask_triton(
    scores: torch.Tensor, threshold: float, *, minimum: int = 1, maximum: int | None = None
) -> torch.Tensor:
    """Same rule as :func:`.naive.cumulative_mass_mask_reference` (non-negative ``scores``), in the kernel."""
    return _launch(scores, None, threshold=threshold, minimum=minimum, maximum=-1 if maximum is None else maximum)


def topk_by_rank_mask_triton(ranking: torch.Tensor, keep_count: torch.Tensor) -> torch.Tensor:
    """Same rule as :func:`.naive.topk_by_rank_mask_reference`, in the kernel."""
    if keep_count.shape != ranking.shape[:-1]:
        raise ValueError(f"keep_count must have shape {tuple(ranking.shape[:-1])}, got {tuple(keep_count.shape)}")
    return _launch(ranking, keep_count, threshold=0.0, minimum=0, maximum=-1)
