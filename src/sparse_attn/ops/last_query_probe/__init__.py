"""The last-query probe (vertical-slash, FlexPrefill): exact attention of the last queries, reduced.

The softmax of the last ``num_queries`` queries against every key, summed over those
queries per key (vertical lines), per diagonal distance (slash lines) and per KV block.
No fused kernel: the PyTorch code in :mod:`.naive`, chunked over heads, is the
implementation and the entry point.
"""

from .naive import ProbeSums, block_sum, probe_last_queries

__all__ = ["ProbeSums", "block_sum", "probe_last_queries"]
