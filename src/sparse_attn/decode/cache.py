"""A paged KV cache for sparse decode, with per-page key summaries kept up to date on append.

One :class:`PagedKVCache` holds one attention layer's keys and values for a batch of sequences
of different lengths, in the layout :func:`sparse_attn.ops.paged_decode.paged_decode` reads:

* ``k_pages`` / ``v_pages`` ``(capacity, Hkv, P, D)``: a pool of pages of ``P`` tokens;
  ``page_table`` ``(B, max_pages)`` int32 maps a sequence's logical page ``i`` (tokens
  ``[i * P, (i + 1) * P)``) to its physical page; ``seq_lens`` ``(B,)`` int32. Pages are taken
  from a free list as sequences grow and returned on :meth:`crop`; the pool grows (doubling)
  when it runs out, or is sized once with ``capacity_tokens``. ``page_counts`` ``(B,)`` int32:
  the logical pages each sequence uses (kept beside ``seq_lens`` so selections need no
  arithmetic on the device).
* Summaries per physical page and KV head, over the page's valid tokens:
  ``key_min`` / ``key_max`` ``(capacity, Hkv, D)`` (Quest's per-channel bounds, in the keys'
  dtype: exact), ``key_sum`` ``(capacity, Hkv, D)`` float32 (the mean key is
  :meth:`page_key_means`: the float32 sum keeps it accurate over a page), and, once label
  channels are set (Double Sparsity's offline calibration, :meth:`set_label_channels`), the
  label cache ``labels`` ``(capacity, Hkv, P, r)``: each token's key at the ``r`` channels of
  its KV head, in the keys' dtype (Double Sparsity also quantizes it to 4 bits; not done here).

* Coarse summaries over super-pages of ``G = super_page`` consecutive logical pages of a
  sequence (the two-level selection of ``quest``, ``levels=2``): ``super_min`` / ``super_max``
  ``(B, max_super, Hkv, D)`` in the keys' dtype, indexed by (sequence, logical super-page
  ``j``: tokens ``[j * G * P, (j + 1) * G * P)``), each the element-wise min/max over the
  super-page's valid tokens (so over its pages' ``key_min`` / ``key_max``); unused entries hold
  ``+inf`` / ``-inf``; and ``super_sum`` (same shape, float32), the sum of its keys (``moba``'s
  block means at decode).

Summaries are updated incrementally on :meth:`append` (element-wise min/max and sums reduced
into the touched pages and super-pages: a decode step touches one of each per sequence) and
recomputed on :meth:`crop` for a page or super-page left partial (a minimum cannot be
decremented): a page from its rows, a super-page from its remaining pages' summaries.

Memory overhead of the summaries per page and KV head, with ``s`` bytes per key element:
``2·D·s`` (min, max) + ``4·D`` (float32 sum) + ``P·r·s`` (labels, if calibrated), against
``2·P·D·s`` for the page's keys and values: a fraction ``(1 + 2/s)/P + r/(2·D)``. For bf16
(``s = 2``) at ``P = 16``, ``D = 128``: 12.5 % without labels, 18.75 % with ``r = 16``. The
coarse summaries add ``2·D·s + 4·D`` per super-page: ``(1 + 2/s)/(G·P)`` of the keys and values
(0.8 % at ``G = 16``, ``P = 16``, bf16).

Host state: each sequence's length is also kept on the host (the caller appends known token
counts), so appends and crops never wait on the device. Device state for the kernels
(``page_table``, ``seq_lens``, ``page_counts``) is uploaded from pinned host memory without
blocking (CUDA) and written in place while the table's width is unchanged, so a decode step
captured in a CUDA graph reads the cache's current state on replay (the pools and the table
are reallocated when they grow: reserve ``capacity_tokens`` before capturing, and capture
again when the table widens).
"""

from __future__ import annotations

import torch

from ..checks import check_int

__all__ = ["PagedKVCache"]


CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class PagedKVCache:
    """One layer's paged KV cache for ``batch`` sequences (see the module docstring for the layout).

    Args:
        batch: number of sequences.
        kv_heads, head_dim: the layer's KV heads and head size; appends must match them.
        page_size: tokens per page ``P`` (16, 32, 64 are the measured choices; any >= 1 works).
        dtype, device: of keys and values.
        capacity_tokens: pages to allocate up front, in tokens (default: grow on demand).
        super_page: pages per super-page ``G`` of the coarse summaries (default 16).
    """

    def __init__(
        self,
        batch: int,
        kv_heads: int,
        head_dim: int,
        *,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        capacity_tokens: int | None = None,
        super_page: int = 16,
    ) -> None:
        for name, value in (
            ("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("page_size", page_size),
            ("super_page", super_page),
        ):  # fmt: skip
            check_int(name, value)
        check_int("capacity_tokens", capacity_tokens, minimum=0, allow_none=True)
        if dtype not in CACHE_DTYPES:  # what the paged decode kernel and its reference take
            raise TypeError(f"dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
        self.batch, self.kv_heads, self.head_dim, self.page_size = batch, kv_heads, head_dim, page_size
        self.super_page = super_page
        self.dtype, self.device = dtype, _concrete(torch.device(device))
        self.lengths: list[int] = [0] * batch
        self.seq_lens = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.page_counts = torch.zeros(batch, dtype=torch.int32, device=self.device)
        self.page_table = torch.zeros((batch, 1), dtype=torch.int32, device=self.device)
        self.label_channels: torch.Tensor | None = None
        self.labels: torch.Tensor | None = None
        # Decode methods that reuse a selection over several steps keep it here, per method and
        # options (``quest``'s ``reselect_every``); anything but an append clears it.
        self.selection_memo: dict = {}
        self._pages: list[list[int]] = [[] for _ in range(batch)]
        self._free: list[int] = []
        self.capacity = 0
        self.k_pages = self._empty_pages(0)
        self.v_pages = self._empty_pages(0)
        self.key_min = self._empty_summary(0, self.dtype)
        self.key_max = self._empty_summary(0, self.dtype)
        self.key_sum = self._empty_summary(0, torch.float32)
        self.super_min = self._empty_super(0, float("inf"))
        self.super_max = self._empty_super(0, float("-inf"))
        self.super_sum = self._empty_super(0, 0.0, torch.float32)
        self._grow(-(-(capacity_tokens or 0) // page_size))
        # Per sequence: room for an even share of the reserved tokens (grows when a sequence needs more).
        self._grow_super(-(-(capacity_tokens or 0) // (batch * page_size * super_page)))

    # ----------------------------------------------------------------------------- storage
    def _empty_pages(self, count: int) -> torch.Tensor:
        return torch.zeros((count, self.kv_heads, self.page_size, self.head_dim), dtype=self.dtype, device=self.device)

    def _empty_summary(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((count, self.kv_heads, self.head_dim), dtype=dtype, device=self.device)

    def _empty_super(self, count: int, fill: float, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = (self.batch, count, self.kv_heads, self.head_dim)
        return torch.full(shape, fill, dtype=dtype or self.dtype, device=self.device)

    def _grow_super(self, needed: int) -> None:
        """Room for ``needed`` super-pages per sequence (doubling), new entries at the identities."""
        have = self.super_min.shape[1]
        if needed <= have:
            return
        extra = max(needed, 2 * have) - have
        self.super_min = torch.cat([self.super_min, self._empty_super(extra, float("inf"))], 1)
        self.super_max = torch.cat([self.super_max, self._empty_super(extra, float("-inf"))], 1)
        self.super_sum = torch.cat([self.super_sum, self._empty_super(extra, 0.0, torch.float32)], 1)

    def _upload(self, host: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``host`` on the cache's device without blocking the host (pinned memory on CUDA), into ``out``
        when given (same shape: kernels captured in a CUDA graph keep reading the same buffer)."""
        if self.device.type == "cuda":
            host = host.pin_memory()
        if out is not None:
            return out.copy_(host, non_blocking=True)
        return host.to(self.device, non_blocking=True)

    def _grow(self, pages: int) -> None:
        """Add ``pages`` physical pages to the pool (and to the free list)."""
        if pages <= 0:
            return
        extend = {
            "k_pages": self._empty_pages(pages),
            "v_pages": self._empty_pages(pages),
            "key_min": self._empty_summary(pages, self.dtype),
            "key_max": self._empty_summary(pages, self.dtype),
            "key_sum": self._empty_summary(pages, torch.float32),
        }
        if self.labels is not None:
            extend["labels"] = self.labels.new_zeros((pages, *self.labels.shape[1:]))
        for name, extra in extend.items():
            setattr(self, name, torch.cat([getattr(self, name), extra]))
        # Lowest page ids first, so a fresh cache fills pages in order.
        self._free.extend(range(self.capacity + pages - 1, self.capacity - 1, -1))
        self.capacity += pages

    def _take_pages(self, count: int) -> list[int]:
        """``count`` free pages, their summaries reset (the pool grows, doubling, when short)."""
        if count > len(self._free):
            self._grow(max(self.capacity, count - len(self._free)))
        pages = [self._free.pop() for _ in range(count)]
        self._reset_summaries(pages)
        return pages

    def _reset_summaries(self, pages: list[int]) -> None:
        """A page that summarizes no token yet holds the identities of min, max and sum."""
        if pages:
            index = self._upload(torch.tensor(pages, dtype=torch.long))
            self.key_min[index] = float("inf")
            self.key_max[index] = float("-inf")
            self.key_sum[index] = 0.0

    def _sync_page_table(self) -> None:
        width = max(1, max(len(pages) for pages in self._pages))
        table = torch.zeros((self.batch, width), dtype=torch.int32)
        for b, pages in enumerate(self._pages):
            table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        same_width = self.page_table.shape[1] == width
        self.page_table = self._upload(table, self.page_table if same_width else None)
        self._upload(torch.tensor(self.lengths, dtype=torch.int32), self.seq_lens)
        self._upload(torch.tensor(self.num_pages(), dtype=torch.int32), self.page_counts)
        self._grow_super(-(-width // self.super_page))

    # ----------------------------------------------------------------------------- updates
    def check_compatible(self, name: str, x: torch.Tensor) -> None:
        """Raise naming ``name`` unless ``x`` is ``(B, Hkv, T, D)`` in this cache's dtype and device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        expected = (self.batch, self.kv_heads, self.head_dim)
        if x.dim() != 4 or (x.shape[0], x.shape[1], x.shape[3]) != expected:
            raise ValueError(
                f"{name} must be (batch, kv_heads, tokens, head_dim) = ({self.batch}, {self.kv_heads}, T, "
                f"{self.head_dim}) to fit this cache (a cache from another model or layer?), got {tuple(x.shape)}"
            )
        if x.dtype != self.dtype:
            raise TypeError(f"{name} must have the cache's dtype {self.dtype}, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"{name} must be on the cache's device {self.device}, got {x.device}")

    def append(self, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | None = None) -> None:
        """Append tokens: ``k`` / ``v`` ``(B, Hkv, T, D)``; sequence ``b`` takes its first ``lengths[b]``
        (default ``T``) tokens, after its current last token (a prefill chunk or one decode token)."""
        self.check_compatible("k", k)
        self.check_compatible("v", v)
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        tokens = k.shape[2]
        if lengths is not None and not isinstance(lengths, (list, tuple, torch.Tensor)):
            raise TypeError(f"lengths must be a list of ints (one per sequence) or None, got {lengths!r}")
        lengths = (
            [tokens] * self.batch
            if lengths is None
            else [int(n) if isinstance(n, torch.Tensor) else n for n in lengths]
        )
        if len(lengths) != self.batch:
            raise ValueError(f"lengths must have one entry per sequence ({self.batch}), got {len(lengths)}")
        for n in lengths:
            check_int("lengths[i]", n, minimum=0)
            if n > tokens:
                raise ValueError(f"lengths[i] must be <= the {tokens} tokens given, got {n}")
        sequences, offsets, positions = [], [], []
        needed = [-(-(self.lengths[b] + n) // self.page_size) - len(self._pages[b]) for b, n in enumerate(lengths)]
        fresh = self._take_pages(sum(needed))
        for b, n in enumerate(lengths):
            start = self.lengths[b]
            self._pages[b] += fresh[: needed[b]]
            del fresh[: needed[b]]
            sequences.append(torch.full((n,), b, dtype=torch.long))
            offsets.append(torch.arange(n))
            positions.append(torch.arange(start, start + n))
            self.lengths[b] = start + n
        self._sync_page_table()
        sequence = self._upload(torch.cat(sequences))
        token = self._upload(torch.cat(offsets))
        position = self._upload(torch.cat(positions))
        physical = self.page_table[sequence, position // self.page_size].long()
        row = position % self.page_size
        keys = k[sequence, :, token]  # (N, Hkv, D)
        self.k_pages[physical, :, row] = keys
        self.v_pages[physical, :, row] = v[sequence, :, token]
        self._reduce_into(physical, row, keys)
        self._reduce_into_super(
            sequence * self.super_min.shape[1] + position // (self.page_size * self.super_page), keys
        )

    def _reduce_into_super(self, flat: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold ``keys`` ``(N, Hkv, D)`` into the super-page summaries at flat (sequence, super-page) indices."""
        index = flat[:, None, None].expand_as(keys)
        self.super_min.view(-1, self.kv_heads, self.head_dim).scatter_reduce_(0, index, keys, "amin")
        self.super_max.view(-1, self.kv_heads, self.head_dim).scatter_reduce_(0, index, keys, "amax")
        self.super_sum.view(-1, self.kv_heads, self.head_dim).index_add_(0, flat, keys.float())

    def _reduce_into(self, physical: torch.Tensor, row: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold the keys written at (``physical``, ``row``) into their pages' summaries."""
        index = physical[:, None, None].expand_as(keys)
        self.key_min.scatter_reduce_(0, index, keys, "amin")
        self.key_max.scatter_reduce_(0, index, keys, "amax")
        self.key_sum.index_add_(0, physical, keys.float())
        if self.labels is not None:
            self.labels[physical, :, row] = self._label_values(keys)

    def _label_values(self, keys: torch.Tensor) -> torch.Tensor:
        """``keys`` ``(..., Hkv, D)`` at each head's label channels: ``(..., Hkv, r)``."""
        channels = self.label_channels.expand(*keys.shape[:-2], *self.label_channels.shape)
        return torch.gather(keys, -1, channels)

    def crop(self, max_length: int) -> None:
        """Keep each sequence's first ``max_length`` tokens (shorter ones unchanged); free pages past them."""
        check_int("max_length", max_length, minimum=0)
        self.selection_memo.clear()  # a remembered selection may name pages freed here
        partial, cropped = [], []
        for b in range(self.batch):
            if self.lengths[b] <= max_length:
                continue
            cropped.append(b)
            self.lengths[b] = max_length
            keep = -(-max_length // self.page_size)
            self._free.extend(reversed(self._pages[b][keep:]))
            del self._pages[b][keep:]
            if max_length % self.page_size:
                partial.append((self._pages[b][-1], max_length % self.page_size))
        self._sync_page_table()
        self._reset_summaries([page for page, _ in partial])
        for page, rows in partial:
            row = torch.arange(rows, device=self.device)
            physical = torch.full_like(row, page)
            self._reduce_into(physical, row, self.k_pages[page].transpose(0, 1)[:rows])
        span = self.super_page
        for b in cropped:
            # Super-pages past the sequence back to the identities; the last kept one from its pages' summaries.
            kept = -(-len(self._pages[b]) // span)
            self.super_min[b, kept:] = float("inf")
            self.super_max[b, kept:] = float("-inf")
            self.super_sum[b, kept:] = 0.0
            if kept:
                pages = self._upload(torch.tensor(self._pages[b][(kept - 1) * span :], dtype=torch.long))
                self.super_min[b, kept - 1] = self.key_min[pages].amin(0)
                self.super_max[b, kept - 1] = self.key_max[pages].amax(0)
                self.super_sum[b, kept - 1] = self.key_sum[pages].sum(0)

    def set_label_channels(self, channels: torch.Tensor) -> None:
        """Double Sparsity's calibrated label channels, int64 ``(Hkv, r)``; builds the label cache of the tokens held."""
        if not isinstance(channels, torch.Tensor) or channels.dtype not in (torch.int32, torch.int64):
            raise TypeError("channels must be an integer torch.Tensor of shape (kv_heads, r)")
        if channels.dim() != 2 or channels.shape[0] != self.kv_heads or channels.shape[1] == 0:
            raise ValueError(f"channels must have shape ({self.kv_heads}, r) with r >= 1, got {tuple(channels.shape)}")
        if bool(((channels < 0) | (channels >= self.head_dim)).any()):
            raise ValueError(f"channels must lie in [0, {self.head_dim}), got {channels.min()}..{channels.max()}")
        self.label_channels = channels.to(device=self.device, dtype=torch.int64)
        # (capacity, P, Hkv, D) view of the keys, so the gather sees (..., Hkv, D).
        self.labels = self._label_values(self.k_pages.transpose(1, 2)).transpose(1, 2).contiguous()

    # ----------------------------------------------------------------------------- reads
    def page_key_means(self) -> torch.Tensor:
        """Mean key of each physical page's valid tokens, float32 ``(capacity, Hkv, D)`` (0 for free pages)."""
        fill = torch.zeros(self.capacity)
        for b, pages in enumerate(self._pages):
            for i, page in enumerate(pages):
                fill[page] = min(self.page_size, self.lengths[b] - i * self.page_size)
        return self.key_sum / fill.clamp(min=1).to(self.device)[:, None, None]

    def num_pages(self) -> list[int]:
        """Logical pages each sequence uses."""
        return [len(pages) for pages in self._pages]

    def sequence(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence ``b``'s keys and values in order, each ``(Hkv, lengths[b], D)`` (a copy)."""
        self._check_sequence(b)
        return self._read(self.k_pages, b, 0, self.lengths[b]), self._read(self.v_pages, b, 0, self.lengths[b])

    def keys(self, b: int, start: int, end: int) -> torch.Tensor:
        """Sequence ``b``'s keys of tokens ``[start, end)``, ``(Hkv, end - start, D)`` (a copy of those pages only)."""
        self._check_sequence(b)
        if not 0 <= start <= end <= self.lengths[b]:
            raise ValueError(f"token range [{start}, {end}) is outside sequence {b}'s {self.lengths[b]} tokens")
        return self._read(self.k_pages, b, start, end)

    def _check_sequence(self, b) -> None:
        check_int("b", b, minimum=0)
        if b >= self.batch:
            raise ValueError(f"b must be a sequence index below the cache's batch of {self.batch}, got {b}")

    def _read(self, pool: torch.Tensor, b: int, start: int, end: int) -> torch.Tensor:
        first = start // self.page_size
        pages = torch.tensor(self._pages[b][first : -(-end // self.page_size)], dtype=torch.long, device=self.device)
        offset = start - first * self.page_size
        rows = pool[pages].transpose(0, 1).reshape(self.kv_heads, -1, self.head_dim)
        return rows[:, offset : offset + end - start]


def _concrete(device: torch.device) -> torch.device:
    """``device`` with its index filled in (``cuda`` -> ``cuda:<current>``), so it compares equal to
    the device of the tensors made on it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
