"""NSA: Native Sparse Attention's three branches on the block-sparse kernels.

Paper: Jingyang Yuan, Huazuo Gao, Damai Dai, Junyu Luo, Liang Zhao, Zhengyan Zhang, Zhenda Xie,
Y. X. Wei, Lean Wang, Zhiping Xiao, et al., "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", 2025, arXiv:2502.11089.

Rule (paper, Section 3). For a query token at position ``t``, per query head,
``out = g_cmp * attn(q, K_cmp, V_cmp) + g_slc * attn(q, K_slc, V_slc) + g_win * attn(q, K_win, V_win)``
with gates ``g`` in (0, 1) from a learned projection and a sigmoid:

* compressed: keys and values cut into blocks of ``compress_block`` (l = 32) tokens every
  ``compress_stride`` (d = 16) tokens; a learned MLP with an intra-block position encoding maps
  each block to one compressed key (value). Token ``t`` attends to the compressed tokens whose
  whole block lies at or before ``t``.
* selected: keys cut into blocks of ``select_block`` (l' = 64) tokens; each is scored by the
  compressed branch's attention probabilities of the compressed blocks overlapping it, summed
  over the query heads of the GQA group (one selection per KV head, so the group's heads load
  the same blocks); the ``select_top_n`` (n = 16) best blocks are kept, the first block and the
  two local blocks (the token's own and the one before) always among them, causal inside the
  own block. Computed by :func:`sparse_attn.block_sparse_attention` on a ``block_q = 1`` pattern
  with one list per KV head: the token-granular Triton kernel on CUDA, the reference elsewhere.
* sliding window: the last ``window`` (w = 512) tokens up to ``t``.

Defaults are the paper's: l = 32, d = 16, l' = 64, n = 16, w = 512, ``compressor="mlp"``.
Options outside the paper: ``window=0`` drops the sliding-window branch and
``compressor="mean"`` compresses a block by the mean of its keys (values), with no parameters:
together with ``compress_block = compress_stride = select_block = 64`` this is the configuration
flash-linear-attention's NSA kernels run (``benchmarks/token_sparse.py`` compares the two).
``compressor="mean_mlp"`` is the block's mean plus the paper's MLP as a residual whose last layer
starts at zero: it starts as mean pooling and has the MLP's capacity. ``gate_bias`` sets the
gates' initial biases (compressed, selected, window; default 0, every gate 1/2).
``sparse_attn.nn.nsa_models.swap_in_nsa`` starts a pretrained model's NSA from ``mean_mlp`` and
biases (-4, 4, -4), so the module first computes nearly the selected branch alone, which, with
mean-pooled compressed keys choosing the blocks, is close to the model's dense attention
(SmolLM2-135M at 4K, no training: validation loss 2.554 against dense 2.539, where the paper-like
start gives 2.835; ``benchmarks/nsa_start.py``).

How each branch runs (all through :func:`sparse_attn.block_sparse_attention`, so each gets the
backend's forward and backward and the reference off CUDA):

* compressed (:meth:`NativeSparseAttention.compressed_branch`): query position ``p`` sees the
  compressed tokens ``i <= (p + 1) // d - l / d``, a bound shared by the ``d`` positions with
  the same ``(p + 1) // d``. The queries are regrouped so that each residue ``(p + 1) % d`` is a
  batch entry (``d`` per sequence, each with the sequence's compressed K/V) with one row per
  ``(p + 1) // d``; the branch is then plain causal attention of ``~S / d`` rows over the ``~S / d``
  compressed tokens on a dense causal block pattern (the Gluon / Triton block kernels on CUDA),
  which also returns the log-sum-exp the selection needs. Exact; one copy of q in, of the output
  back (:mod:`sparse_attn.ops.residue_rows`: a row-gather kernel each way on CUDA), and of the
  compressed K/V per residue. (Residues as extra query heads of the same KV
  head, the layout before, made the backward's dK/dV walk ``d`` x the group's heads in one
  program per KV block: 5.6 of 18.4 GPU-ms of a forward + backward at 8K, fla's configuration.)
* selection scores (:func:`sparse_attn.ops.compressed_scores.compressed_block_scores`, a fused
  Triton kernel on CUDA): the compressed probabilities recomputed from that log-sum-exp, summed
  over the group and mapped to selection blocks, chunk by chunk of query tokens; each chunk's
  top-n lists written straight into the pattern by
  :func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks` (one kernel: no boolean mask).
* selected (:meth:`NativeSparseAttention.selected_branch`): the token-granular kernels pack the
  group's heads into a tile's rows; with the module's default ``token_rows="overlap"`` a tile
  holds four neighbouring tokens where their lists overlap enough (a model reading text), one
  token otherwise.
* sliding window: a block pattern over 128-token blocks (:func:`window_pattern`) whose first
  blocks are cut by :class:`CausalWindowRule`, a one-field box predicate the Triton and Gluon
  kernels evaluate per score (:mod:`sparse_attn.rule_predicate`).
* gates: ``sigmoid(q . W + b)`` per branch and query head, the branches' gated sum in one pass
  (:func:`sparse_attn.ops.gated_sum.gated_sum`: a Triton kernel forward and backward on CUDA).
* training on CUDA: the step after compression (the three branches, the selection between them
  and the gated sum) is one autograd node (:func:`sparse_attn.nn.nsa_fused.fused_nsa`) whose
  backward hands each branch the delta the gated sum's backward computes and sums q's gradient
  in the kernels' stores: the same kernels, without three delta passes and three 1 GiB additions
  at 64K (forward + backward 113.5 against 121.4 ms with the previous path on one H100,
  together with the token dK/dV's one-token entries and the compressor below).
* compression: the MLP's first layer over a block of ``l`` keys is the sum of the products of
  its ``l / d`` chunks of ``d`` keys (two at the defaults; :meth:`_BlockCompressor.sequence`), so
  no overlapping copy of the keys is made.

Choices where the paper leaves room (or where its text could not be checked here: the stored
copies reachable in this session held summaries, not the equations):

- Selection scores: the paper maps compressed-block scores to selection blocks with a fixed sum
  (its equation 9) when blocking schemes differ. Here block ``j`` of the selection scheme gets
  ``sum_i p_cmp[i] * overlap(i, j) / d``: each compressed block ``i`` (keys
  ``[i d, i d + l)``) contributes its probability weighted by how many stride-``d`` pieces it
  shares with block ``j``. With l = 32, d = 16, l' = 64 this weights the compressed blocks
  overlapping a selection block by 1 or 2 sixteenths, as the paper's sum does; the exact
  indexing of equation 9 is unverified.
- Forced blocks count towards the ``n``: a token keeps block 0, its own block and the one before
  plus the ``n - 3`` best others (all earlier blocks when it has fewer than ``n``); equal scores
  rank the lower block first.
- Tokens before the first whole compression block (``t < l - 1``) see no compressed token: that
  branch contributes 0 for them (its gate multiplies zeros), and their selection keeps the forced
  blocks only.
- One set of keys and values feeds the three branches (the paper allows separate ones per
  branch), so a pretrained model's projections can initialise it.
- Gates: ``sigmoid(q_h . W_h + b_h)`` per query head from the query (the paper computes them from
  the input features with an MLP); ``W`` starts at zero and ``b`` at zero, so every gate starts
  at 1/2.
- Compression MLP: ``Linear(l * D, D)``, GELU, ``Linear(D, D)`` over the block's keys plus a
  learned ``(l, D)`` position encoding (zero-initialised), one MLP for keys and one for values,
  shared by the heads.
- Differentiable in q, k, v and every parameter through the compressed and window branches and
  the selected branch's attention; the top-n choice is discrete (no gradient through it).
- The selection ranks the compressed probabilities of the backend's precision (bf16 inputs, float32
  accumulation on CUDA): near-ties can rank differently than in float32.

Memory: the branches run on the block-sparse kernels (O(S * D) activations, patterns of
O(S / 128) entries per row block); the selection is streamed chunk by chunk of query tokens,
holding one chunk's ``(B, Hkv, c, S / l')`` scores (at most ``CHUNK_ELEMENTS``) beside the
pattern's ``(B, Hkv, S, n)`` lists. No ``S x S`` table at any point.
Decode steps (``Sq = 1``, one query at the end of the keys) take their own path
(:meth:`NativeSparseAttention.decode_step`, :mod:`sparse_attn.ops.nsa_decode`): the same rule
without patterns, plans or host synchronisation; the lists come from the ranking prefill uses
(:func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks`' rule on the group-summed
probabilities). On CUDA without gradients to record it is four fused Triton kernels (the GQA
group's rows in one tile, split-K over the compressed tokens and over the selected and window
keys); elsewhere a few dense PyTorch operations on the group's rows, float32 scores and softmax
(float64 for float64 inputs), differentiable. The compressed tokens of a growing cache are kept in a
:class:`CompressedTokenCache` (``forward(..., cache=)``), so a step compresses only the block its
new key completes, once in ``d`` steps; :func:`sparse_attn.nn.nsa_models.swap_in_nsa` keeps one
per layer inside the model's transformers cache (``benchmarks/nsa_decode.py`` times a step
against dense decode).
A transformers model is switched to it by :func:`sparse_attn.nn.nsa_models.swap_in_nsa`.
"""

from __future__ import annotations

import functools
import warnings
import weakref

import torch
from torch import nn

from .. import api  # a module, not its names: methods import sparse_attn.nn while api loads
from ..backends import configs, plan_ahead
from ..checks import check_attention_inputs, check_int, is_finite_number
from ..masked_pattern import MaskedPattern
from ..ops._chunking import CHUNK_ELEMENTS
from ..ops.causal_top_blocks import causal_top_blocks
from ..ops.compressed_scores import compressed_block_scores, visible_count
from ..ops.gated_sum import gated_sum
from ..ops.nsa_decode import nsa_decode_step
from ..ops.residue_rows import from_residues as _from_residue
from ..ops.residue_rows import to_residues as _by_residue
from ..pattern import BlockSparsePattern, dense_pattern
from ..rule_predicate import pack_box
from .nsa_fused import fused_nsa

__all__ = ["COMPRESSORS", "CompressedTokenCache", "NativeSparseAttention"]

# The compressors: the paper's MLP, parameter-free mean pooling, and mean pooling plus an MLP
# residual whose last layer starts at zero (a pretrained model's start, see swap_in_nsa).
COMPRESSORS = ("mlp", "mean", "mean_mlp")


class _BlockCompressor(nn.Module):
    """``phi``: ``(B, H, n_blocks, l, D)`` blocks -> ``(B, H, n_blocks, D)`` compressed tokens.

    ``residual``: the block's mean plus the MLP's output, the MLP's last layer zero-initialised,
    so the compressor starts as mean pooling and learns from there (``compressor="mean_mlp"``)."""

    def __init__(self, block: int, head_dim: int, *, residual: bool = False):
        super().__init__()
        self.residual = residual
        self.position = nn.Parameter(torch.zeros(block, head_dim))
        self.mlp = nn.Sequential(nn.Linear(block * head_dim, head_dim), nn.GELU(), nn.Linear(head_dim, head_dim))
        if residual:
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        out = self.mlp((blocks + self.position.to(blocks.dtype)).flatten(-2))
        return blocks.mean(-2) + out if self.residual else out

    def sequence(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        """:meth:`forward` of every whole block of ``x`` ``(B, H, S, D)`` (blocks ``stride`` apart from
        0), without materialising the overlapping blocks: a block is ``l / d`` consecutive chunks of
        ``d`` rows, so the first layer's product over a block is the sum of each chunk's product
        with its slice of the weight (``W x_block = sum_c W_c chunk_{i+c}``, plus ``W pos`` and the
        bias once), each taken over all chunks by one matmul; the mean likewise from chunk sums.
        The same function (up to rounding: the partial products are summed in float32); its
        backward is those matmuls' instead of an overlapping unfold's scatter-add (0.79 ms of
        NSA's 64K forward + backward on an H100, for k and v; the step 113.5 against 114.4-115.3 ms
        in one process, 42nd session)."""
        block, dim = self.position.shape
        pieces = block // stride
        count = (x.shape[2] - block) // stride + 1
        chunks = x[:, :, : (count + pieces - 1) * stride].unflatten(2, (count + pieces - 1, stride))
        first = self.mlp[0]
        weight = first.weight.unflatten(1, (pieces, stride * dim))  # (D, pieces, d * D)
        flat = chunks.flatten(-2)
        wide = torch.promote_types(x.dtype, torch.float32)  # the partial sums' dtype
        hidden = sum(
            torch.nn.functional.linear(flat, weight[:, piece])[:, :, piece : piece + count].to(wide)
            for piece in range(pieces)
        )
        constant = torch.nn.functional.linear(self.position.to(x.dtype).flatten(), first.weight, first.bias)
        hidden = (hidden + constant.to(wide)).to(constant.dtype)
        out = self.mlp[2](self.mlp[1](hidden))
        if not self.residual:
            return out
        sums = chunks.to(wide).sum(-2)
        mean = sum(sums[:, :, piece : piece + count] for piece in range(pieces)) / block
        return mean.to(out.dtype) + out


class CausalWindowRule:
    """Token rule of the sliding-window branch: key ``j`` is allowed for the query at position ``i``
    when ``i - window < j <= i``. Offers a one-field
    box predicate (:mod:`sparse_attn.rule_predicate`), so the Triton and Gluon kernels evaluate it
    arithmetically."""

    def __init__(self, window: int, seq_k: int, device=None):
        self.window, self.seq_k, self.device = window, seq_k, device

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        return (k_pos <= q_pos) & (k_pos > q_pos - self.window)

    def to(self, device) -> CausalWindowRule:
        return CausalWindowRule(self.window, self.seq_k, device)

    def kernel_predicate(self):
        positions = torch.arange(self.seq_k, device=self.device)
        never = torch.zeros(self.seq_k, dtype=torch.bool, device=self.device)
        return pack_box(
            [positions], [positions - (self.window - 1)], [positions], [max(self.seq_k - 1, 1)],
            key_always=never, query_all=never,
        )  # fmt: skip


@functools.lru_cache(maxsize=16)
def window_pattern(seq_q: int, seq_k: int, window: int, *, block: int = 128, device=None) -> MaskedPattern:
    """The causal sliding window of ``window`` keys (the query's own included) as a block pattern
    with :class:`CausalWindowRule` inside the blocks it cuts: per query block, the key blocks from
    the one holding its first row's oldest key to its diagonal. Cached per shape, so the kernels'
    plans (lists, predicate table) are built once, not on every forward."""
    offset = seq_k - seq_q
    n_q, n_k = -(-seq_q // block), -(-seq_k // block)
    first_row = torch.arange(n_q, device=device) * block + offset  # key-space position of each block's first row
    last_row = torch.clamp(first_row + block - 1, max=seq_k - 1)
    lowest = torch.clamp(first_row - (window - 1), min=0) // block
    highest = last_row // block
    span = int((highest - lowest).max()) + 1 if n_q else 1
    slots = torch.arange(span, device=device)
    indices = lowest[:, None] + slots[None, :]
    counts = (highest - lowest + 1).to(torch.int32)
    used = slots[None, :] < counts[:, None].long()
    indices = torch.where(used, indices, 0).clamp(max=n_k - 1)
    # A kept block is whole for the window when its first key is inside every row's window.
    partial = used & (indices * block < (last_row - (window - 1))[:, None])
    pattern = BlockSparsePattern(
        kv_counts=counts[None, None], kv_indices=indices.to(torch.int32)[None, None],
        block_q=block, block_k=block, seq_q=seq_q, seq_k=seq_k,
    )  # fmt: skip
    return MaskedPattern._same_lists(pattern, token_rule=CausalWindowRule(window, seq_k, device),
                                     rule_partial=partial[None, None])  # fmt: skip


def _pads_rows(q: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor) -> bool:
    """Whether the compressed branch pads its regrouped rows to whole blocks: on CUDA when a
    gradient is to be taken, so that the block kernels' Gluon backward passes (which need lengths
    that are multiples of the blocks) can take the branch's backward instead of the Triton passes."""
    return q.device.type == "cuda" and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k_cmp, v_cmp))


def _aligned_padding(rows: int, n_cmp: int, block: int = 128) -> tuple[int, int]:
    """``(lead, tail)``: ``lead`` rows before the ``rows`` regrouped queries and ``tail`` rows after
    them and after the ``n_cmp`` compressed keys, so that both lengths are multiples of ``block``
    while each real row keeps its keys under the causal pattern aligned to the last query (its
    offset ``n_cmp - rows`` drops by ``lead``, a multiple of ``block`` away, and the ``tail`` rows
    and keys pair up after the real ones, which never see the padded keys). ``(0, 0)`` where the
    rows outnumber the keys (no such alignment keeps them)."""
    if rows > n_cmp:
        return 0, 0
    return (n_cmp - rows) % block, -n_cmp % block


@functools.lru_cache(maxsize=16)
def causal_pattern(seq_q: int, seq_k: int, device) -> BlockSparsePattern:
    """Every causal block of ``(seq_q, seq_k)`` (cached per shape, as :func:`window_pattern`)."""
    return dense_pattern(seq_q=seq_q, seq_k=seq_k, causal=True, device=device)


class NativeSparseAttention(nn.Module):
    """NSA over projected ``q`` ``(B, Hq, Sq, D)`` and ``k``, ``v`` ``(B, Hkv, Sk, D)`` (causal; the
    queries are the last ``Sq`` of ``Sk`` positions). See the module docstring for the rule,
    defaults and choices. ``backend`` is passed to :func:`sparse_attn.block_sparse_attention` for
    the selected branch.

    ``token_rows``: the token kernels' tile for the selected branch, as
    :func:`sparse_attn.backends.kernel_configs` ``(token_rows=...)`` (a ``kernel_configs`` around the call
    wins; ``None`` leaves the library's default, one token per tile). The default,
    ``"overlap"``, takes four-token tiles where four neighbouring tokens' lists overlap enough
    (as when a model reads text) and one-token tiles otherwise. On one H100 at 64K (paper
    defaults, 64/4 heads, bf16; same code, one run each): forward + backward 127.8 ms against
    140.5 with one-token tiles where neighbouring tokens share blocks (forward 39.5 against
    43.9), and 1.4 ms slower on white noise (142.9 against 141.5), where measuring the overlap
    is the cost and one-token tiles are taken; that measurement has since been sampled, costing
    0.44 instead of 0.92 ms there (docs/h100.md, "``token_rows="overlap"``, timed")."""

    DEFAULT_TOKEN_ROWS = configs.TOKEN_ROWS_BY_OVERLAP

    def __init__(
        self,
        head_dim: int,
        num_q_heads: int,
        num_kv_heads: int,
        *,
        compress_block: int = 32,
        compress_stride: int = 16,
        select_block: int = 64,
        select_top_n: int = 16,
        window: int = 512,
        compressor: str = "mlp",
        gate_bias: tuple[float, float, float] = (0.0, 0.0, 0.0),
        backend: str = "auto",
        token_rows: int | str | None = DEFAULT_TOKEN_ROWS,
    ):
        super().__init__()
        for name, value in (
            ("head_dim", head_dim),
            ("num_q_heads", num_q_heads),
            ("num_kv_heads", num_kv_heads),
            ("compress_block", compress_block),
            ("compress_stride", compress_stride),
            ("select_block", select_block),
            ("select_top_n", select_top_n),
        ):
            check_int(name, value)
        check_int("window", window, minimum=0)
        if token_rows is not None:
            configs.check_token_rows(token_rows)
        if compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, got {compressor!r}")
        biases = tuple(gate_bias) if isinstance(gate_bias, (tuple, list)) else ()
        if len(biases) != 3 or not all(is_finite_number(b) for b in biases):
            raise ValueError(
                f"gate_bias must be three finite numbers (compressed, selected, window), got {gate_bias!r}"
            )
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, value in (("compress_block", compress_block), ("select_block", select_block)):
            if value % compress_stride:
                raise ValueError(f"{name} ({value}) must be a multiple of compress_stride ({compress_stride})")
        self.head_dim, self.num_q_heads, self.num_kv_heads = head_dim, num_q_heads, num_kv_heads
        self.compress_block, self.compress_stride = compress_block, compress_stride
        self.select_block, self.select_top_n, self.window, self.backend = select_block, select_top_n, window, backend
        self.compressor, self.token_rows = compressor, token_rows
        if compressor != "mean":
            residual = compressor == "mean_mlp"
            self.compress_k = _BlockCompressor(compress_block, head_dim, residual=residual)
            self.compress_v = _BlockCompressor(compress_block, head_dim, residual=residual)
        self.gate_weight = nn.Parameter(torch.zeros(num_q_heads, head_dim, 3))
        self.gate_bias = nn.Parameter(torch.tensor(biases, dtype=torch.float32).repeat(num_q_heads, 1))

    def compressed_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_cmp, v_cmp, end)``: ``(B, Hkv, n_cmp, D)`` compressed keys and values and, int64
        ``(n_cmp,)``, the last key position each covers (``n_cmp = (Sk - l) // d + 1``, 0 if ``Sk < l``)."""
        count = self.compressed_count(k.shape[2])
        end = torch.arange(count, device=k.device) * self.compress_stride + self.compress_block - 1
        return (*self._compress(k, v), end)

    def compressed_count(self, seq_k: int) -> int:
        """How many compressed tokens ``seq_k`` keys have: ``(Sk - l) // d + 1``, 0 if ``Sk < l``."""
        return max(0, (seq_k - self.compress_block) // self.compress_stride + 1)

    def _compress(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed keys and values of every whole block of ``k``, ``v`` (blocks start at 0, ``d`` apart)."""
        if self.compressed_count(k.shape[2]) == 0:
            empty = k.new_zeros((*k.shape[:2], 0, k.shape[3]))
            return empty, empty
        if self.compressor == "mean":
            # unfold: (B, H, n, D, l) -> (B, H, n, l, D)
            blocks_k = k.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
            blocks_v = v.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
            return blocks_k.mean(-2), blocks_v.mean(-2)
        return self.compress_k.sequence(k, self.compress_stride), self.compress_v.sequence(v, self.compress_stride)

    def compressed_branch(self, q, k_cmp, v_cmp, seq_k: int, scale: float):
        """``(out, lse)``: the compressed branch ``(B, Hq, Sq, D)`` and its natural-log log-sum-exp
        ``(B, Hq, Sq)`` (``-inf``, with output 0, where a query sees no compressed token).

        Query position ``p`` sees compressed token ``i`` iff ``i <= (p + 1) // d - l / d``: the same
        bound for the ``d`` positions with equal ``(p + 1) // d``. So the queries are regrouped, each
        residue ``(p + 1) % d`` a batch entry (``d`` per sequence, each with its compressed K/V) with one
        row per ``m = (p + 1) // d``, and row ``m`` sees the first ``m - l / d + 1`` compressed tokens:
        ordinary causal attention of those rows over the compressed tokens, which the block kernels
        run (:func:`sparse_attn.block_sparse_attention` on a dense causal pattern, differentiable).
        A single query (a decode step) sees a prefix of the compressed tokens: dense attention over
        that prefix, without the regrouping.
        """
        seq_q, n_cmp = q.shape[2], k_cmp.shape[2]
        if seq_q == 1 and n_cmp:  # a decode step: its visible compressed tokens are a prefix
            visible = visible_count(seq_k - 1, self.compress_block, self.compress_stride, n_cmp)
            if visible == 0:
                return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
            pattern = causal_pattern(1, visible, q.device)
            return api.block_sparse_attention(
                q, k_cmp[:, :, :visible], v_cmp[:, :, :visible], pattern, scale=scale, backend=self.backend,
                return_lse=True,
            )  # fmt: skip
        geometry = self.residue_geometry(seq_q, seq_k, n_cmp, pads=_pads_rows(q, k_cmp, v_cmp))
        if geometry is None:
            return q.new_zeros(q.shape), q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32)
        grouped, k_rep, v_rep, pattern = self.residue_operands(q, k_cmp, v_cmp, geometry)
        out, lse = api.block_sparse_attention(
            grouped, k_rep, v_rep, pattern, scale=scale, backend=self.backend, return_lse=True
        )
        return self.from_residue_rows(out, lse, geometry, seq_q)

    def residue_operands(self, q, k_cmp, v_cmp, geometry):
        """``(grouped, k_rep, v_rep, pattern)``: :meth:`compressed_branch`'s attention inputs for
        :meth:`residue_geometry`'s ``geometry`` (differentiable where its inputs are): the queries
        regrouped by residue with the ``lead`` / ``tail`` rows, and per residue (a batch entry) the
        sequence's compressed keys and values padded by ``tail``, and their dense causal pattern.
        A copy of d x the compressed tokens: dK/dV then sum over a KV head's query heads per
        residue in parallel, and the d residues are summed afterwards, not walked by one program."""
        front, rows, skipped, lead, tail = geometry
        stride = self.compress_stride
        grouped = _by_residue(q, front, rows + tail, stride, skipped - lead)
        if tail:
            k_cmp, v_cmp = (torch.nn.functional.pad(x, (0, 0, 0, tail)) for x in (k_cmp, v_cmp))
        k_rep, v_rep = (x.repeat_interleave(stride, dim=0) for x in (k_cmp, v_cmp))
        return grouped, k_rep, v_rep, causal_pattern(grouped.shape[2], k_cmp.shape[2], q.device)

    def from_residue_rows(self, out, lse, geometry, seq_q: int):
        """``(out, lse)`` ``(B, Hq, Sq, D)`` / ``(B, Hq, Sq)`` from the regrouped attention's (the
        inverse of :meth:`residue_operands`' regrouping; ``lse`` ``-inf`` where a query sees no
        compressed token). The tail rows stay: no token maps to them, so the regrouping back never
        reads them (and its gradient leaves them 0); slicing them off cost a zero-filled copy of
        the whole regrouped output's gradient in the backward (1.7 ms at 64K on an H100)."""
        front, _, skipped, lead, _ = geometry
        if lead:
            out, lse = out[:, :, lead:], lse[:, :, lead:]
        stride = self.compress_stride
        return (
            _from_residue(out, front, seq_q, stride, skipped),
            _from_residue(lse, front, seq_q, stride, skipped, fill=float("-inf")),
        )

    def residue_geometry(self, seq_q: int, seq_k: int, n_cmp: int, *, pads: bool):
        """The compressed branch's regrouping (:meth:`compressed_branch`) for ``seq_q`` queries at the
        end of ``seq_k`` keys with ``n_cmp`` compressed tokens: ``(front, rows, skipped, lead, tail)``,
        or ``None`` where no query sees a compressed token. Query ``t`` is at padded index
        ``front + t`` (``rows`` rows of ``d``); the first ``skipped`` rows see none; ``lead`` rows
        before and ``tail`` rows after (and ``tail`` keys) make the lengths whole blocks when
        ``pads`` (:func:`_aligned_padding`)."""
        stride, per_block = self.compress_stride, self.compress_block // self.compress_stride
        offset = seq_k - seq_q
        first_row, last_row = (offset + 1) // stride, seq_k // stride
        rows, front = last_row - first_row + 1, offset + 1 - first_row * stride
        start_row = max(first_row, per_block)  # rows before it see no compressed token
        if n_cmp == 0 or start_row > last_row:
            return None
        lead, tail = _aligned_padding(last_row - start_row + 1, n_cmp) if pads else (0, 0)
        return front, rows, start_row - first_row, lead, tail

    def selection(self, q: torch.Tensor, k_cmp: torch.Tensor, lse: torch.Tensor, seq_k: int, scale: float):
        """The selected branch's pattern: ``block_q = 1``, ``block_k = select_block``, one list per KV
        head, scored by :func:`sparse_attn.ops.compressed_scores.compressed_block_scores` from the
        compressed branch's log-sum-exp ``lse`` ``(B, Hq, Sq)`` and listed by
        :func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks`, chunk by chunk of query tokens,
        straight into the pattern's tensors."""
        batch, q_heads, seq_q, dim = q.shape
        offset = seq_k - seq_q
        n_blocks = -(-seq_k // self.select_block)
        top_n = min(self.select_top_n, n_blocks)
        indices = torch.empty((batch, self.num_kv_heads, seq_q, top_n), dtype=torch.int32, device=q.device)
        counts = torch.empty((batch, self.num_kv_heads, seq_q), dtype=torch.int32, device=q.device)
        # One chunk's float32 scores (B, Hkv, c, n_blocks) at most CHUNK_ELEMENTS.
        rows = max(1, CHUNK_ELEMENTS // max(1, batch * self.num_kv_heads * n_blocks))
        for start in range(0, seq_q, rows):
            tokens = range(start, min(seq_q, start + rows))
            self._select_rows(q, k_cmp, lse, tokens, offset, n_blocks, top_n, scale, indices, counts)
        pattern = BlockSparsePattern(
            kv_counts=counts, kv_indices=indices, block_q=1, block_k=self.select_block, seq_q=seq_q, seq_k=seq_k
        )
        pattern._cache[("validated", True)] = True  # valid by construction: ascending, causal, own block listed
        return pattern

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _select_rows(self, q, k_cmp, lse, tokens: range, offset: int, n_blocks: int, top_n: int, scale: float,
                     indices: torch.Tensor, counts: torch.Tensor) -> None:  # fmt: skip
        """Rows ``tokens`` of :meth:`selection`'s lists (float32 scores: autocast off).

        The scores cover the blocks the chunk's last row can see (at least ``top_n``), not all
        ``n_blocks``: later blocks are not eligible for any of its rows, and the ranking's work
        grows with the width (at 64K, four chunks of 16K rows score 256, 512, 768 and 1024 blocks)."""
        width = min(n_blocks, max(top_n, (tokens.stop - 1 + offset) // self.select_block + 1))
        if k_cmp.shape[2]:
            block_scores = compressed_block_scores(
                q[:, :, tokens.start : tokens.stop], k_cmp, lse[:, :, tokens.start : tokens.stop],
                first_pos=tokens.start + offset, compress_block=self.compress_block,
                compress_stride=self.compress_stride, select_block=self.select_block, n_select=width,
                scale=scale,
            )  # fmt: skip
        else:  # no compressed token yet: every row keeps its forced blocks only (ranked_from below)
            block_scores = torch.zeros((q.shape[0], self.num_kv_heads, len(tokens), width), device=q.device)
        causal_top_blocks(
            block_scores, first_pos=tokens.start + offset, block=self.select_block, top_n=top_n,
            initial=1, local=2, ranked_from=self.compress_block - 1,
            out=(indices[:, :, tokens.start : tokens.stop], counts[:, :, tokens.start : tokens.stop]),
        )  # fmt: skip

    def _check_inputs(self, q, k, v, scale) -> float:
        """The softmax scale, after checking q, k, v against each other and against this module."""
        scale = check_attention_inputs(q, k, v, scale)
        if q.shape[1] != self.num_q_heads or k.shape[1] != self.num_kv_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"expected q with {self.num_q_heads} heads and k/v with {self.num_kv_heads} heads of head_dim "
                f"{self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        weights = self.gate_weight.dtype
        if q.dtype != weights and not torch.is_autocast_enabled(q.device.type):
            raise TypeError(
                f"q, k and v are {q.dtype} but the module's parameters are {weights}: convert the module "
                f"(module.to({q.dtype})) or run it under torch.autocast"
            )
        return scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        scale: float | None = None,
        cache: CompressedTokenCache | None = None,
    ) -> torch.Tensor:
        """``(B, Hq, Sq, D)`` in q's dtype. ``cache``: a :class:`CompressedTokenCache` that keeps the
        compressed tokens of ``k``, ``v`` between calls on a growing key sequence (inference: with
        gradients enabled it is not used). A single query (``Sq = 1``) runs :meth:`decode_step`."""
        scale = self._check_inputs(q, k, v, scale)
        if cache is not None and not isinstance(cache, CompressedTokenCache):
            raise TypeError(f"cache must be a CompressedTokenCache or None, got {type(cache).__name__}")
        seq_q, seq_k = q.shape[2], k.shape[2]
        if cache is not None and torch.is_grad_enabled():
            _warn_once("NativeSparseAttention: cache= is for inference; with gradients enabled every call "
                       "recomputes the compressed tokens and leaves the cache as it was")  # fmt: skip
            cache = None
        if cache is not None:
            k_cmp, v_cmp = cache.update(self, k, v, seq_q)
        else:
            k_cmp, v_cmp = self._compress(k, v)
        if seq_q == 1:
            return self.decode_step(q, k, v, k_cmp, v_cmp, scale=scale)
        # Training on CUDA: the three branches and the gates as one autograd node whose backward
        # shares the deltas and q's gradient buffer (nn.nsa_fused); None elsewhere.
        fused = fused_nsa(self, q, k, v, k_cmp, v_cmp, scale, lambda *x: self.compressed_branch(*x, seq_k, scale))
        if fused is not None:
            return fused
        compressed, lse = self.compressed_branch(q, k_cmp, v_cmp, seq_k, scale)
        with torch.no_grad():
            pattern = self.selection(q.detach(), k_cmp.detach(), lse.detach(), seq_k, scale)
        windowed = []
        if self.window:
            # The selected branch's tile choice started (its counts queued, read behind an event),
            # then the window branch, which does not depend on the selection: the device runs it
            # while the host waits for those counts and builds the selected branch's lists.
            self.plan_selected_ahead(q, k, v, pattern)
            window = window_pattern(seq_q, seq_k, self.window, device=q.device)
            windowed.append(api.block_sparse_attention(q, k, v, window, scale=scale, backend=self.backend))
        branches = [compressed, self.selected_branch(q, k, v, pattern, scale), *windowed]
        # One pass on CUDA without gradients to record (ops.gated_sum's kernel), else PyTorch.
        return gated_sum(q, branches, self.gate_weight, self.gate_bias)

    def selected_token_rows(self) -> int | str | None:
        """The ``token_rows`` the selected branch runs with: :attr:`token_rows`, unless a
        :func:`sparse_attn.backends.kernel_configs` ``(token_rows=...)`` around the call says
        otherwise (then ``None``: the configuration in force is left as it is)."""
        return self.token_rows if configs.current().token_rows is None else None

    def plan_selected_ahead(self, q, k, v, pattern: BlockSparsePattern, backend=None) -> None:
        """Start the selected branch's host decisions on ``pattern`` under its ``token_rows``
        (:func:`sparse_attn.backends.plan_ahead`; ``backend`` the resolved module where the caller
        has it, else the module's backend by name)."""
        with configs.kernel_configs(token_rows=self.selected_token_rows()):  # None changes nothing
            plan_ahead(self.backend if backend is None else backend, q, k, v, pattern, causal=True)

    def selected_branch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: BlockSparsePattern, scale: float
    ) -> torch.Tensor:
        """The selected branch: attention over ``pattern`` (:meth:`selection`'s), differentiable, on
        the module's backend, the token kernels' tiles per :attr:`token_rows` unless a
        :func:`sparse_attn.backends.kernel_configs` ``(token_rows=...)`` around the call says otherwise."""
        with configs.kernel_configs(token_rows=self.selected_token_rows()):  # None changes nothing
            return api.block_sparse_attention(q, k, v, pattern, scale=scale, backend=self.backend)

    def decode_step(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cmp: torch.Tensor,
        v_cmp: torch.Tensor,
        *,
        scale: float,
    ) -> torch.Tensor:
        """NSA for one query per sequence at the last key position (``q`` ``(B, Hq, 1, D)``), given
        the compressed tokens ``k_cmp``, ``v_cmp`` ``(B, Hkv, n_cmp, D)`` of ``k``, ``v``: the rule of
        :meth:`forward` without patterns, by :func:`sparse_attn.ops.nsa_decode.nsa_decode_step`.

        Compressed branch: softmax over the visible compressed tokens; its probabilities, summed over
        the group and spread over the stride pieces each compressed block covers, score the
        selection blocks (:func:`~sparse_attn.ops.compressed_scores.compressed_block_scores`' rule),
        ranked as in prefill (forced first, ties to the lower block); the listed blocks' keys up to
        the query; the window is the last ``w`` keys. On CUDA without gradients to record, four fused
        Triton kernels; otherwise dense PyTorch operations on each KV head's group of rows (float32
        scores, float64 for float64 inputs), differentiable in ``q``, ``k``, ``v`` and the parameters
        (not through the discrete choice).
        """
        return nsa_decode_step(
            q, k, v, k_cmp, v_cmp, self.gate_weight, self.gate_bias, scale=scale,
            compress_block=self.compress_block, compress_stride=self.compress_stride,
            select_block=self.select_block, top_n=self.select_top_n, window=self.window,
        )  # fmt: skip

    def selected_pattern(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
                         ) -> BlockSparsePattern:  # fmt: skip
        """The pattern the selected branch computes for these inputs (no gradient)."""
        scale = self._check_inputs(q, k, v, scale)
        with torch.no_grad():
            k_cmp, v_cmp, _ = self.compressed_tokens(k, v)
            _, lse = self.compressed_branch(q, k_cmp, v_cmp, k.shape[2], scale)
            return self.selection(q, k_cmp, lse, k.shape[2], scale)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


class CompressedTokenCache:
    """The compressed keys and values of one layer's growing key/value sequence, for decode steps.

    Pass it as ``NativeSparseAttention.forward(..., cache=)`` on every call of a generation (prefill
    and each step, the keys and values being the whole cache so far). A compressed token depends
    only on its block's keys (values), so the tokens of whole blocks never change as keys are
    appended: each call compresses only the blocks its new keys complete (one token per ``d``
    decode steps) and returns them with the kept ones.

    It checks what it can: the same module, batch, heads, head_dim, dtype and device, and that the
    keys grew by exactly the call's queries (``Sk - Sq`` equals the length it saw last); otherwise
    it starts over from the keys it is given (correct, one full compression). It cannot see keys
    that changed in place at the same length (a batch reordered by beam search, a crop followed by
    as many new keys in another call): call :meth:`reset` then. ``swap_in_nsa`` does this for the
    transformers cache it lives in (it wraps the cache's ``crop``, ``reset``, ``reorder_cache``,
    ``batch_select_indices`` and ``batch_repeat_interleave``). Not for training: with gradients
    enabled ``forward`` does not use it.

    Memory: ``2 * B * Hkv * n_cmp * D`` elements in the keys' dtype (``n_cmp ~ Sk / d``: 1/16 of the
    key/value cache at the paper's ``d = 16``), with capacity doubling as it grows.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        """Forget every compressed token (the next call compresses its keys from the start)."""
        self._keys = self._values = None
        self._owner = None
        self.count = 0  # compressed tokens held
        self.seq_k = 0  # key length at the last call

    def update(self, module: NativeSparseAttention, k: torch.Tensor, v: torch.Tensor, new_tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """``(k_cmp, v_cmp)`` of ``k``, ``v`` (the whole sequence so far, whose last ``new_tokens`` keys
        are new since the last call), computing only the compressed tokens not held yet."""
        check_int("new_tokens", new_tokens, minimum=0)
        seq_k, target = k.shape[2], module.compressed_count(k.shape[2])
        held = self._keys
        same = (
            held is not None
            and self._owner is not None
            and self._owner() is module
            and self.seq_k == seq_k - new_tokens
            and held.shape[:2] == k.shape[:2]
            and held.shape[3] == k.shape[3]
            and held.dtype == k.dtype
            and held.device == k.device
        )
        if not same:
            self.reset()
        if target > self.count:
            start = self.count * module.compress_stride
            stop = (target - 1) * module.compress_stride + module.compress_block
            new_k, new_v = module._compress(k[:, :, start:stop], v[:, :, start:stop])
            self._append(new_k, new_v)
        self._owner, self.seq_k = weakref.ref(module), seq_k
        if self._keys is None:
            empty = k.new_zeros((*k.shape[:2], 0, k.shape[3]))
            return empty, empty
        return self._keys[:, :, :target], self._values[:, :, :target]

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        need = self.count + keys.shape[2]
        if self._keys is None or need > self._keys.shape[2]:
            capacity = max(need, 2 * (0 if self._keys is None else self._keys.shape[2]), 16)
            grown = [x.new_empty((*x.shape[:2], capacity, x.shape[3])) for x in (keys, values)]
            if self._keys is not None:
                grown[0][:, :, : self.count] = self._keys[:, :, : self.count]
                grown[1][:, :, : self.count] = self._values[:, :, : self.count]
            self._keys, self._values = grown
        self._keys[:, :, self.count : need] = keys
        self._values[:, :, self.count : need] = values
        self.count = need
