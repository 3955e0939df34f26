"""Block maxima of logits: per query row, the largest ``q · k`` over the keys of each KV block.

The fine-grained scores of SALE (every query row against every key, at low precision) and
AnchorAttention (every pooled query against every key) are only ever compared with a per-row
threshold, so what an estimator needs of them is each row's maximum per KV block: a block is
kept when some row's maximum in it clears that row's threshold. The ``(rows, Sk)`` logits are
built a chunk of key blocks at a time and reduced at once, so the result is ``O(rows * n_kv)``.
No fused kernel: the PyTorch code in :mod:`.naive` is the implementation and the entry point
(a fused low-precision kernel would read int4/fp8 codes; see :mod:`sparse_attn.ops.lowbit`).
"""

from .naive import block_max_logits

__all__ = ["block_max_logits"]
