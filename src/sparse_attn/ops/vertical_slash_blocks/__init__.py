"""Vertical-slash -> blocks: every block that a selected key column or diagonal crosses.

Counted with prefix sums over the selected lines, ``O(n_q * n_kv)`` per head whatever the
number of lines, for a range of query blocks at a time (a streaming estimator asks for one
chunk's rows). No fused kernel: the PyTorch code in :mod:`.naive` is the implementation
and the entry point.
"""

from .naive import vertical_slash_block_mask

__all__ = ["vertical_slash_block_mask"]
