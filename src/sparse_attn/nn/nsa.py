"""NSA: Native Sparse Attention's three branches on the token-granular block-sparse kernels.

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

Defaults are the paper's: l = 32, d = 16, l' = 64, n = 16, w = 512.

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
  plus the ``n - 3`` best others (all earlier blocks when it has fewer than ``n``).
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

Memory: the compressed and window branches are computed in chunks of query tokens
(checkpointed under autograd), so memory stays ``O(S * (S / d + w))`` per chunk of rows, never a
whole ``S x S`` table; the selection is streamed by :func:`sparse_attn.ops.to_pattern.stream_pattern`.
A transformers model is switched to it by :func:`sparse_attn.nn.nsa_models.swap_in_nsa`; a decode
step (one query over the cache) recomputes the compressed tokens of the whole cache and plans a
one-row pattern: correct, not yet fast (a cache of compressed tokens is the next step).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import api  # a module, not its names: methods import sparse_attn.nn while api loads
from ..checks import check_attention_inputs, check_int
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern

__all__ = ["NativeSparseAttention"]

# Score elements per chunk of query rows in the compressed and window branches.
_CHUNK_SCORES = 1 << 22


class _BlockCompressor(nn.Module):
    """``phi``: ``(B, H, n_blocks, l, D)`` blocks -> ``(B, H, n_blocks, D)`` compressed tokens."""

    def __init__(self, block: int, head_dim: int):
        super().__init__()
        self.position = nn.Parameter(torch.zeros(block, head_dim))
        self.mlp = nn.Sequential(nn.Linear(block * head_dim, head_dim), nn.GELU(), nn.Linear(head_dim, head_dim))

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.mlp((blocks + self.position.to(blocks.dtype)).flatten(-2))


def _probabilities(q, keys, key_pos, query_pos, lowest, scale):
    """Softmax of ``q`` ``(B, Hkv, G, c, D)`` against ``keys`` ``(B, Hkv, n, D)`` over the keys with
    ``lowest <= key_pos <= query_pos``: ``(B, Hkv, G, c, n)``; a row with no such key is all 0."""
    scores = torch.matmul(q * scale, keys.unsqueeze(2).transpose(-1, -2))
    visible = (key_pos[None, :] <= query_pos[:, None]) & (key_pos[None, :] >= lowest[:, None])
    scores = scores.masked_fill(~visible, float("-inf"))
    # softmax of an all -inf row is NaN; such rows get weight 0 everywhere instead.
    return torch.softmax(scores, dim=-1).masked_fill(~visible.any(-1)[:, None], 0.0)


def _chunk_attention(q, keys, values, key_pos, query_pos, lowest, scale):
    """:func:`_probabilities` times ``values`` ``(B, Hkv, n, D)``: ``(B, Hkv, G, c, D)``."""
    return torch.matmul(_probabilities(q, keys, key_pos, query_pos, lowest, scale), values.unsqueeze(2))


class NativeSparseAttention(nn.Module):
    """NSA over projected ``q`` ``(B, Hq, Sq, D)`` and ``k``, ``v`` ``(B, Hkv, Sk, D)`` (causal; the
    queries are the last ``Sq`` of ``Sk`` positions). See the module docstring for the rule,
    defaults and choices. ``backend`` is passed to :func:`sparse_attn.block_sparse_attention` for
    the selected branch."""

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
        backend: str = "auto",
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
            ("window", window),
        ):
            check_int(name, value)
        if num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, value in (("compress_block", compress_block), ("select_block", select_block)):
            if value % compress_stride:
                raise ValueError(f"{name} ({value}) must be a multiple of compress_stride ({compress_stride})")
        self.head_dim, self.num_q_heads, self.num_kv_heads = head_dim, num_q_heads, num_kv_heads
        self.compress_block, self.compress_stride = compress_block, compress_stride
        self.select_block, self.select_top_n, self.window, self.backend = select_block, select_top_n, window, backend
        self.compress_k = _BlockCompressor(compress_block, head_dim)
        self.compress_v = _BlockCompressor(compress_block, head_dim)
        self.gate_weight = nn.Parameter(torch.zeros(num_q_heads, head_dim, 3))
        self.gate_bias = nn.Parameter(torch.zeros(num_q_heads, 3))

    def compressed_tokens(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k_cmp, v_cmp, end)``: ``(B, Hkv, n_cmp, D)`` compressed keys and values and, int64
        ``(n_cmp,)``, the last key position each covers (``n_cmp = (Sk - l) // d + 1``, 0 if ``Sk < l``)."""
        seq_k = k.shape[2]
        count = max(0, (seq_k - self.compress_block) // self.compress_stride + 1)
        end = torch.arange(count, device=k.device) * self.compress_stride + self.compress_block - 1
        if count == 0:
            empty = k.new_zeros((*k.shape[:2], 0, k.shape[3]))
            return empty, empty, end
        # unfold: (B, H, n, D, l) -> (B, H, n, l, D)
        blocks_k = k.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
        blocks_v = v.unfold(2, self.compress_block, self.compress_stride).transpose(-1, -2)
        return self.compress_k(blocks_k), self.compress_v(blocks_v), end

    def _branch(self, q, keys, values, key_pos, offset: int, scale: float, window: int | None = None):
        """A dense branch over ``keys`` / ``values`` ``(B, Hkv, n, D)`` at positions ``key_pos``
        (ascending), causal, and with ``window`` within the last ``window`` positions (then
        ``key_pos`` must be ``arange(n)`` and each chunk reads only its window's keys). Computed
        in chunks of query rows, checkpointed under autograd: ``(B, Hq, Sq, D)``."""
        batch, q_heads, seq_q, dim = q.shape
        grouped = q.view(batch, self.num_kv_heads, q_heads // self.num_kv_heads, seq_q, dim)
        span = keys.shape[2] if window is None else window
        step = max(1, _CHUNK_SCORES // max(1, batch * q_heads * span))
        outputs = []
        for start in range(0, seq_q, step):
            query_pos = torch.arange(start, min(start + step, seq_q), device=q.device) + offset
            if window is None:
                lowest, keys_in = torch.zeros_like(query_pos), slice(None)
            else:
                lowest = query_pos - (window - 1)
                keys_in = slice(max(0, int(lowest[0])), int(query_pos[-1]) + 1)
            inputs = (grouped[:, :, :, start : start + step], keys[:, :, keys_in], values[:, :, keys_in])
            inputs += (key_pos[keys_in], query_pos, lowest, scale)
            if torch.is_grad_enabled() and any(x.requires_grad for x in (q, keys, values)):
                outputs.append(checkpoint(_chunk_attention, *inputs, use_reentrant=False))
            else:
                outputs.append(_chunk_attention(*inputs))
        return torch.cat(outputs, dim=3).view(batch, q_heads, seq_q, dim)

    def selection(self, q: torch.Tensor, k_cmp: torch.Tensor, end: torch.Tensor, seq_k: int, scale: float):
        """The selected branch's pattern: ``block_q = 1``, ``block_k = select_block``, one list per KV head."""
        batch, q_heads, seq_q, dim = q.shape
        group = q_heads // self.num_kv_heads
        n_blocks = -(-seq_k // self.select_block)
        columns = torch.arange(n_blocks, device=q.device)
        # Overlap of compressed block i (keys [i d, i d + l)) with selection blocks, in stride pieces:
        # it spans at most two selection blocks, `first` and `first + 1`.
        start = end - (self.compress_block - 1)
        first = start // self.select_block
        in_first = (torch.clamp((first + 1) * self.select_block, max=end + 1) - start) // self.compress_stride
        in_second = self.compress_block // self.compress_stride - in_first
        second = torch.clamp(first + 1, max=n_blocks - 1)

        def mask_rows(tokens: range) -> torch.Tensor:
            query_pos = torch.arange(tokens.start, tokens.stop, device=q.device) + (seq_k - seq_q)
            own = (query_pos // self.select_block)[:, None]
            block_scores = torch.zeros((batch, self.num_kv_heads, len(tokens), n_blocks), device=q.device)
            if k_cmp.shape[2]:
                grouped = q[:, :, tokens.start : tokens.stop].float().view(batch, self.num_kv_heads, group, -1, dim)
                probabilities = _probabilities(
                    grouped, k_cmp.float(), end, query_pos, torch.zeros_like(query_pos), scale
                )
                summed = probabilities.sum(2)  # over the group: (B, Hkv, c, n_cmp)
                block_scores.index_add_(-1, first, summed * in_first)
                block_scores.index_add_(-1, second, summed * in_second)
                # A token that sees no compressed token ranks nothing: it keeps the forced blocks.
                block_scores.masked_fill_(~(end[None, :] <= query_pos[:, None]).any(-1)[:, None], float("-inf"))
            else:
                block_scores.fill_(float("-inf"))
            forced = (columns == 0) | (columns == own) | (columns == own - 1)
            block_scores = torch.where(forced, float("inf"), block_scores).masked_fill(columns > own, float("-inf"))
            top = block_scores.topk(min(self.select_top_n, n_blocks), dim=-1).indices
            chosen = torch.zeros_like(block_scores, dtype=torch.bool).scatter_(-1, top, True)
            return chosen & (block_scores > float("-inf"))

        return stream_pattern(
            mask_rows,
            batch=batch,
            heads=self.num_kv_heads,
            seq_q=seq_q,
            seq_k=seq_k,
            block_q=1,
            block_k=self.select_block,
            causal=True,
            device=q.device,
            row_elements=batch * q_heads * (k_cmp.shape[2] + n_blocks),
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
        """``(B, Hq, Sq, D)`` in q's dtype."""
        scale = check_attention_inputs(q, k, v, scale)
        if q.shape[1] != self.num_q_heads or k.shape[1] != self.num_kv_heads or q.shape[3] != self.head_dim:
            raise ValueError(
                f"expected q with {self.num_q_heads} heads and k/v with {self.num_kv_heads} heads of head_dim "
                f"{self.head_dim}, got q {tuple(q.shape)} and k {tuple(k.shape)}"
            )
        seq_q, seq_k = q.shape[2], k.shape[2]
        offset = seq_k - seq_q
        k_cmp, v_cmp, end = self.compressed_tokens(k, v)
        compressed = self._branch(q, k_cmp, v_cmp, end, offset, scale)
        with torch.no_grad():
            pattern = self.selection(q.detach(), k_cmp.detach(), end, seq_k, scale)
        selected = api.block_sparse_attention(q, k, v, pattern, scale=scale, backend=self.backend)
        positions = torch.arange(seq_k, device=k.device)
        window = self._branch(q, k, v, positions, offset, scale, window=self.window)
        gates = torch.sigmoid(torch.einsum("bhsd,hdg->bhsg", q, self.gate_weight.to(q.dtype)) + self.gate_bias[:, None])
        out = gates[..., 0:1] * compressed + gates[..., 1:2] * selected + gates[..., 2:3] * window
        return out.to(q.dtype)

    def selected_pattern(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None
                         ) -> BlockSparsePattern:  # fmt: skip
        """The pattern the selected branch computes for these inputs (no gradient)."""
        scale = check_attention_inputs(q, k, v, scale)
        with torch.no_grad():
            k_cmp, _, end = self.compressed_tokens(k, v)
            return self.selection(q, k_cmp, end, k.shape[2], scale)
