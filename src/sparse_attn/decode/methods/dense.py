"""Dense decode: every page of the cache, through the same paged kernel as the sparse methods.

The baseline every decode method is compared with, and what the sparse methods fall back to in
their dense layers. ``token_budget`` is accepted (every decode method takes it) and validated,
but dense decode reads the whole cache whatever its value.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...checks import check_int
from ..registry import register_decode_method
from ..selection import dense_selection


@dataclass(frozen=True)
class DenseDecodeConfig:
    token_budget: int | None = None

    def __post_init__(self):
        check_int("token_budget", self.token_budget, allow_none=True)


@register_decode_method(
    "dense", config=DenseDecodeConfig, paper="-", summary="every page of the cache (the baseline; token_budget ignored)"
)
def select_dense(q, cache, config: DenseDecodeConfig, *, layer: int, state: dict):
    return dense_selection(cache)
