"""Random: a seeded random block pattern at a target density (for benchmarks and tests).

Each query block keeps ``round(density * valid_blocks)`` blocks drawn uniformly among its
valid blocks, always including its diagonal blocks in causal mode. Not a method from a
paper: it is the workload that kernels are benchmarked on (the FlexPrefill and
FlexAttention kernel comparisons use random causal patterns the same way).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..checks import check_bool, check_int
from ..pattern import BlockSparsePattern, random_pattern
from ..registry import register_method


@dataclass(frozen=True)
class RandomConfig:
    density: float = 0.1
    seed: int = 0
    per_query_head: bool = False  # one list per query head instead of per KV head

    def __post_init__(self) -> None:
        if isinstance(self.density, bool) or not isinstance(self.density, (int, float)):
            raise TypeError(f"density must be a float, got {type(self.density).__name__}")
        if math.isnan(self.density) or not 0.0 <= self.density <= 1.0:
            raise ValueError(f"density must be in [0, 1], got {self.density}")
        check_int("seed", self.seed, minimum=0)  # what random_pattern takes
        check_bool("per_query_head", self.per_query_head)


@register_method(
    "random",
    config=RandomConfig,
    paper="- (seeded random blocks, a benchmark workload)",
    summary="random blocks at a target density, diagonal kept",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: RandomConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    return random_pattern(
        batch=q.shape[0],
        heads=q.shape[1] if config.per_query_head else k.shape[1],
        seq_q=q.shape[2],
        seq_k=k.shape[2],
        density=float(config.density),
        seed=config.seed,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        device=q.device,
    )
