"""MoBA: each query token routes to the key blocks whose mean key best matches it (Mixture of Block Attention).

Paper: Enzhe Lu, Zhejun Jiang, Jingyuan Liu, Yulun Du, Tao Jiang, Chao Hong, Shaowei Liu,
Weiran He, Enming Yuan, Yuzhi Wang, et al., "MoBA: Mixture of Block Attention for
Long-Context LLMs", 2025, arXiv:2502.13189.

Rule (paper, Section 2.2): the keys are cut into blocks of ``block_size`` tokens. A query token
``q_t`` scores block ``i`` with the parameter-free gate ``s_i = q_t · mean(K[block i])`` and
attends to the ``top_k`` blocks with the highest scores. Causality: blocks after the token's
own block are never routed to (their score is ``-inf``), and every token is always routed to
its own (current) block, inside which the causal mask applies token by token. The selection
is per query token, so the pattern has ``block_q = 1`` and ``block_k = block_size``.

Defaults: ``block_size=4096``, ``top_k=12``: the paper's long-context setting (Llama-8B
continued to 1M tokens, Section 3.2, quoted there as 95.31% sparsity at 1M, i.e.
``1 - 12 * 4096 / 2**20``) and the released implementation's defaults. The paper's
scaling-law runs (Section 3.1) use ``block_size=512, top_k=3`` at 8K (81.25% sparsity,
``1 - 3 * 512 / 8192``); pass those options to reproduce them. (Unverified here: the stored
copies of the paper reachable when this was written held its abstract and summaries only, so
the section numbers and the two settings above are from the paper as remembered, and the
4096 / 12 defaults as the released code's examples use them. Check them against the PDF.)

Choices where the paper leaves room:

- ``top_k`` counts the own block, so a token keeps its own block plus the ``top_k - 1``
  best-scoring earlier blocks. This is how the paper's sparsity figures above add up (they
  count exactly ``top_k`` blocks per token); ``top_k=1`` is the own block alone. The own block
  does not compete: it is kept whatever its score.
- The gate is computed per query head with that head's own query (the paper's formula is per
  head); with GQA the lists are not shared by the group, so ``kv_counts`` is ``(B, Hq, Sq)``.
- ``share_in_group=True`` (not in the MoBA paper; off by default, so the pattern above is
  unchanged): one list per KV head, scored with the gate summed over the query heads of its
  GQA group, ``s_i = sum_h q_{t,h} · mean(K[block i]) = (sum_h q_{t,h}) · mean(K[block i])``.
  This is NSA's group-consistent selection (Yuan et al. 2025, arXiv:2502.11089, which sums
  its selection scores over the heads of a group so the group's heads load the same blocks)
  applied to MoBA's gate: ``kv_counts`` is ``(B, Hkv, Sq)``, and the token-granular kernel
  loads each selected block once for the whole group instead of once per head. The own block
  and top-k rule are unchanged; only the ranking is shared.
- Scores are unscaled float32 dot products (a positive scale cannot change a ranking); ties
  go to the lower block index (the paper does not fix them).
- A token with fewer than ``top_k - 1`` earlier blocks keeps all of them (the first blocks of
  a sequence are dense, as in the paper's causal definition).
- ``Sq < Sk``: queries are the last ``Sq`` positions, so query ``i`` sits at token
  ``Sk - Sq + i`` and its own block is ``(Sk - Sq + i) // block_size``.
- A last partial key block is mean-pooled over its real tokens. In causal mode only the own
  block can be partial, so this matters only when ``causal=False``.
- ``causal=False`` (not in the paper, which is causal): every block other than the own block
  competes, earlier and later ones alike.
- The API's ``block_q`` / ``block_k`` (128 by default, passed by ``sa.estimate``,
  ``sa.sparse_attention`` and ``sa.patch`` for every method) are ignored: MoBA's granularity is
  part of its rule, set by ``block_size``, and a pattern carries its own block sizes, which
  every backend accepts. Raising on them instead would break pipelines that pass one block
  size to every method.

Operators: :func:`sparse_attn.ops.pooling.mean_pool_blocks` (keys pooled once,
``(B, Hkv, n_blocks, D)``), :func:`sparse_attn.ops.gqa.grouped_matmul` (gates without
expanding K), computed chunk by chunk of query tokens, so the gates held at once are a chunk's
``(B, Hq, tokens, n_blocks)``, never ``O(S^2)``. Causal: gates and lists in
:func:`sparse_attn.ops.causal_top_blocks.causal_top_blocks_gated`, one kernel on CUDA that holds
each row tile's gates in registers (16-bit queries take the gate products in their dtype with
float32 accumulation, the pooled keys rounded to it; near-ties can then rank differently than in
the float32 reference). ``causal=False``: :func:`sparse_attn.ops.selection.topk_mask` and
:func:`sparse_attn.ops.to_pattern.stream_pattern`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_bool, check_int
from ..ops.causal_top_blocks import causal_top_blocks_gated
from ..ops.gqa import grouped_matmul
from ..ops.pooling import mean_pool_blocks
from ..ops.selection import topk_mask
from ..ops.to_pattern import stream_pattern
from ..pattern import BlockSparsePattern
from ..registry import register_method


@dataclass(frozen=True)
class MobaConfig:
    block_size: int = 4096
    top_k: int = 12
    share_in_group: bool = False

    def __post_init__(self) -> None:
        check_int("block_size", self.block_size, minimum=1)
        check_int("top_k", self.top_k, minimum=1)
        check_bool("share_in_group", self.share_in_group)


@register_method(
    "moba",
    config=MobaConfig,
    paper="Lu et al. 2025, MoBA: Mixture of Block Attention for Long-Context LLMs (arXiv:2502.13189)",
    summary="per query token: own key block + top-k of q·mean(key block) over earlier blocks (block_q=1)",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: MobaConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    """Token-level pattern: ``block_q = 1``, ``block_k = config.block_size``; ``block_q``/``block_k`` are ignored.

    q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``; lists per query head, ``kv_counts`` int32
    ``(B, Hq, Sq)``, or per KV head, ``(B, Hkv, Sq)``, with ``config.share_in_group``.
    """
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    heads = kv_heads if config.share_in_group else q_heads
    block_size = config.block_size
    pooled_k = mean_pool_blocks(k, block_size)
    n_blocks = pooled_k.shape[2]
    if causal:
        if config.top_k == 1:
            indices, counts = _own_block_lists(batch, heads, seq_q, seq_k, block_size, q.device)
        else:  # gates and lists in one operator (one kernel on CUDA): the own block and the best top_k - 1 earlier
            indices, counts = causal_top_blocks_gated(
                q, pooled_k, heads_per_list=q_heads // heads, first_pos=seq_k - seq_q, block=block_size,
                top_n=min(config.top_k, n_blocks), local=1,
            )  # fmt: skip
        pattern = BlockSparsePattern(
            kv_counts=counts, kv_indices=indices, block_q=1, block_k=block_size, seq_q=seq_q, seq_k=seq_k
        )
        pattern._cache[("validated", True)] = True  # valid by construction: ascending, causal, own block listed
        return pattern

    columns = torch.arange(n_blocks, device=q.device)

    def gate_rows(tokens: range) -> torch.Tensor:
        queries = q[:, :, tokens.start : tokens.stop].float()
        if config.share_in_group:  # the group's summed query scores the group's one list
            queries = queries.unflatten(1, (kv_heads, q_heads // kv_heads)).sum(2)
        return grouped_matmul(queries, pooled_k)

    def mask_rows(tokens: range) -> torch.Tensor:
        positions = torch.arange(tokens.start, tokens.stop, device=q.device) + (seq_k - seq_q)
        own = (positions // block_size)[:, None]
        competing = columns != own
        own_block = columns == own
        if config.top_k == 1:
            return own_block
        gates = gate_rows(tokens).masked_fill(~competing, float("-inf"))
        return (topk_mask(gates, config.top_k - 1) & competing) | own_block

    return stream_pattern(
        mask_rows,
        batch=batch,
        heads=heads,
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=1,
        block_k=block_size,
        causal=causal,
        device=q.device,
        row_elements=batch * q_heads * (n_blocks + dim),
    )


def _own_block_lists(batch: int, heads: int, seq_q: int, seq_k: int, block_size: int, device):
    """``top_k = 1``: every token's list is its own block."""
    own = (torch.arange(seq_q, device=device) + (seq_k - seq_q)) // block_size
    indices = own.to(torch.int32)[None, None, :, None].expand(batch, heads, seq_q, 1).contiguous()
    return indices, torch.ones((batch, heads, seq_q), dtype=torch.int32, device=device)
