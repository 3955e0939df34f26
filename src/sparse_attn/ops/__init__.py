"""Operators: the primitives the estimators in :mod:`sparse_attn.methods` are composed of.

One operator per folder, flash-linear-attention style: ``naive.py`` holds the plain PyTorch
reference, ``triton.py`` (where there is one) the fused kernel, and ``__init__.py`` the entry
point with the one dispatch rule of :mod:`._dispatch` (the kernel on CUDA when it can run
the case, the reference everywhere else). Tests in ``tests/ops/test_<op>.py`` check every
kernel against its reference.

* :mod:`.pooling`: mean-pooled blocks, pooled block logits, block softmax;
* :mod:`.antidiagonal`: XAttention's strided antidiagonal block scoring (the scoring kernel's home);
* :mod:`.sampled_rows`: ProxyAttn's sampled-row block scoring (on the same kernel);
* :mod:`.last_query_probe`: exact attention of the last queries, reduced to vertical,
  slash and block sums;
* :mod:`.selection`: cumulative-mass and top-k selection per row (sort-free Triton kernel);
* :mod:`.vertical_slash_blocks`: selected columns and diagonals -> the blocks they cross;
* :mod:`.block_max`: each row's largest logit per KV block (AnchorAttention's pooled queries);
* :mod:`.lowbit_block_margin`: per block pair, the largest low-bit logit minus its row's
  threshold (SALE; 8-bit tensor-core products of the codes);
* :mod:`.gathered_block_max`: per query block, the largest logit in each of a list of KV blocks
  (HiP's tree search);
* :mod:`.anchor_region`: row maxima and log-sum-exps over sinks and a local window;
* :mod:`.static_masks`: sinks, local windows, power-of-two distances, strided shards;
* :mod:`.pooled_attention_map`: SeerAttention's training target, the block max-pooled,
  row-normalised attention map (two-pass Triton kernel);
* :mod:`.to_pattern`: the streaming assembly every estimator ends with: block masks, one chunk
  of query blocks (or query heads) at a time, written straight into a ``BlockSparsePattern``;
* :mod:`.block_rows`: the geometry's block tables for a range of query blocks;
* :mod:`.gqa`: grouped-query matmul without expanding K, head chunks of whole GQA groups;
* NSA (:mod:`sparse_attn.nn.nsa`): :mod:`.compressed_scores` (selection-block scores from the
  compressed branch), :mod:`.causal_top_blocks` (per-token top-n lists), :mod:`.residue_rows`
  (the compressed branch's residue regrouping), :mod:`.gated_sum` (the gated sum of the
  branches, forward and backward) and :mod:`.nsa_decode` (a whole decode step in four kernels);
* decode (:mod:`sparse_attn.decode`): :mod:`.page_bounds`, :mod:`.page_select` (Quest's bounds
  and top pages), :mod:`.paged_decode` (split-K attention over selected pages);
* :mod:`.row_gather`: whole-row gathers along the sequence (the spatial layouts' permutation).

A new operator gets a folder of its own with these three files (``triton.py`` optional);
a kernel module exposes ``unsupported_reason(x, **case)`` for the dispatch rule. Operators
never allocate ``O(S^2)``: chunked loops stay within ``CHUNK_ELEMENTS`` of :mod:`._chunking`.
Block scores are ``O(n_q * n_kv)`` per head, so the scoring operators take a range of query
blocks (``q_blocks``) and an estimator scores, selects and writes one chunk at a time
(:func:`.to_pattern.stream_pattern`); no estimator holds a whole ``(H, n_q, n_kv)`` table.
"""
