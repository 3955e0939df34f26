"""Static block masks: attention sinks, local windows, power-of-two distances, strided shards.

Closed-form layouts that depend on the geometry only (StreamingLLM's A-shape, Tri-shape,
PowerAttention, S2-Attention's shards). No fused kernel: the masks are ``O(n_q * n_kv)``
bool tables, built by the PyTorch code in :mod:`.naive`, which is the implementation and
the entry point.
"""

from .naive import (
    block_distance,
    check_token_window,
    power_of_two_distance_mask,
    sink_local_block_mask,
    strided_shard_mask,
    token_window_mask,
)

__all__ = [
    "block_distance",
    "check_token_window",
    "power_of_two_distance_mask",
    "sink_local_block_mask",
    "strided_shard_mask",
    "token_window_mask",
]
