"""SLA (Sparse-Linear Attention): full attention on critical blocks, linear attention on marginal ones, none on the rest.

Paper: Jintao Zhang, Haoxu Wang, Kai Jiang, Shuo Yang, Kaiwen Zheng, Haocheng Xi, Ziteng Wang,
Hongzhou Zhu, Min Zhao, Ion Stoica, Joseph E. Gonzalez, Jun Zhu, Jianfei Chen, "SLA: Beyond
Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear Attention", 2025,
arXiv:2509.24006 (Tsinghua University, UC Berkeley).

Rule. The paper finds that a DiT's attention weights split into a few large weights of high
rank and many small ones of very low rank, and treats them differently:

* classification: ``P_c = softmax(pool(Q) pool(K)^T / sqrt(D))`` over mean-pooled query and KV
  blocks; per query block (row of ``P_c``) the top ``critical`` fraction of KV blocks are
  *critical*, the bottom ``negligible`` fraction *negligible*, the rest *marginal*;
* ``O_s``: exact block-sparse softmax attention over the critical blocks;
* ``O_l``: linear attention over the marginal blocks, ``phi(Q_i) H_i / (phi(Q_i) Z_i)`` with
  ``H_i = sum_j phi(K_j)^T V_j`` and ``Z_i = sum_j phi(K_j)^T 1`` over query block ``i``'s
  marginal blocks ``j``; negligible blocks are skipped;
* ``O = O_s + Proj(O_l)``, ``Proj`` a learnable linear map of the head dimension (``D x D``
  weight and bias), fine-tuned with the model.

The pattern is a :class:`~sparse_attn.compensated_pattern.CompensatedPattern` (exact lists:
critical; compensated lists: marginal, ``LINEAR``) carrying ``phi`` and ``Proj``; the compensated
backends compute ``O_s`` and ``O_l`` in one kernel (:mod:`sparse_attn.backends.triton_compensated`)
and apply ``Proj`` after it.

Defaults: ``critical=0.05`` and ``negligible=0.10`` (the paper's ``k_h = 5 %`` and
``k_l = 10 %``, its 95 %-sparsity setting), ``feature_map="softmax"`` (``phi`` = softmax over
the head dimension, the released code's default; ``"elu"`` = ``elu + 1`` and ``"relu"`` also
offered, as in the paper's ablation), ``projection="zero"``. The released code uses 64-token
query and KV blocks: pass ``block_q=64, block_k=64`` (the API's default is 128).

Training-free use and fine-tuning. The released code initialises ``Proj`` to zero (weight and
bias), so an SLA layer starts as exact attention over the critical blocks only: with the
default ``projection="zero"`` ``sa.sparse_attention(q, k, v, "sla", ...)`` *is* block-sparse
attention over the top 5 % of blocks per query block (the linear branch is not computed, and
marginal blocks have no effect until ``Proj`` is trained). That is the paper's starting point,
not its result: its quality numbers are after fine-tuning. ``projection="identity"`` adds the
unprojected ``O_l`` (a training-free guess, not in the paper: ``O_s`` and ``O_l`` are each
normalised over their own blocks, so it over-weights the marginal mass), and
``projection=(weight, bias)`` takes given tensors (e.g. trained ones).
:class:`SparseLinearAttention` holds ``Proj`` as an ``nn.Linear`` initialised to zero and runs
this method with it, so ``Proj`` (and q, k, v, through the reference backend) can be fine-tuned.

Choices where the paper leaves room (the paper's method section was read through summaries,
the released code for the feature maps, the zero initialisation and the block sizes; nothing
is copied from it):

- The class sizes per query block are ``max(1, int(critical * n_kv))`` critical blocks (the
  released code's ``int(topk * n_kv)``, at least one so no row is empty) and
  ``min(int(negligible * n_kv), n_kv - critical)`` negligible ones; ranking ties go to the
  earlier block (a stable sort). The softmax of ``P_c`` is monotone per row, so the ranking is
  that of the pooled logits.
- ``phi`` is applied to the unscaled q and k, as in the released code; a row whose
  ``phi(q) . Z`` is 0 (possible with ``relu``), or a query block with no marginal block, gets
  ``O_l = 0``.
- ``Proj`` is one map per layer shared by all heads (the released code's ``Linear(D, D)``); the
  linear branch is computed in float32.
- Token order: the caller's (raster) order, as in the paper; ``tile=`` reorders into the
  layout's tiles as the other spatial methods do. Text tokens (``text_tokens=``): every query
  keeps the KV blocks holding text as critical (the paper's models attend to text by
  cross-attention).
- Classification in float32, per query head against its KV head's pooled keys (GQA without
  expanding K); lists per query head. Memory: the ``(B, Hq, n_q, n_kv)`` int8 level map.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_fraction, check_int
from ..compensated_pattern import EXACT, FEATURE_MAPS, LINEAR, SKIP, CompensatedPattern, _check_projection
from ..ops.gqa import grouped_matmul
from ..ops.pooling import mean_pool_blocks
from ..registry import register_method
from ._spatial import check_grid_option, spatial_layout
from .psa import text_key_blocks

__all__ = ["SlaConfig", "SparseLinearAttention", "classify_blocks"]

PROJECTIONS = ("zero", "identity")


@dataclass(frozen=True)
class SlaConfig:
    grid: tuple[int, ...] | None = None
    tile: tuple[int, ...] | None = None
    critical: float = 0.05
    negligible: float = 0.10
    feature_map: str = "softmax"
    projection: str | tuple = "zero"
    text_tokens: int = 0
    text_position: str = "after"

    def __post_init__(self) -> None:
        if isinstance(self.projection, list):
            object.__setattr__(self, "projection", tuple(self.projection))
        check_grid_option(self)
        check_fraction("critical", self.critical)
        check_fraction("negligible", self.negligible, open_low=False)
        if self.critical + self.negligible > 1.0:
            raise ValueError(f"critical + negligible must be <= 1, got {self.critical} + {self.negligible}")
        if self.feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {self.feature_map!r}")
        if isinstance(self.projection, str):
            if self.projection not in PROJECTIONS:
                raise ValueError(
                    f"projection must be one of {PROJECTIONS} or a (weight, bias) tuple, got {self.projection!r}"
                )
        else:
            _check_projection(self.projection)
        check_int("text_tokens", self.text_tokens, minimum=0)


def classify_blocks(logits: torch.Tensor, critical: float, negligible: float) -> torch.Tensor:
    """Int8 ``EXACT`` / ``LINEAR`` / ``SKIP`` per block, ``logits``' shape ``(..., n_kv)``: the top
    ``critical`` fraction of each row critical, the bottom ``negligible`` fraction skipped (module docstring)."""
    n_kv = logits.shape[-1]
    n_critical = max(1, int(critical * n_kv))
    n_negligible = min(int(negligible * n_kv), n_kv - n_critical)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
    rank = torch.arange(n_kv, device=logits.device)
    ranked = torch.where(rank < n_critical, EXACT, torch.where(rank >= n_kv - n_negligible, SKIP, LINEAR))
    ranked = ranked.to(torch.int8).expand_as(order)
    return torch.empty_like(ranked).scatter_(-1, order, ranked)


def _projection(config: SlaConfig, dim: int, device) -> tuple | None:
    if config.projection == "zero":
        return None
    if config.projection == "identity":
        return torch.eye(dim, device=device), None
    weight, bias = config.projection
    if weight.shape[0] != dim:
        raise ValueError(f"projection weight is {tuple(weight.shape)} but head_dim is {dim}")
    return weight, bias


@register_method(
    "sla",
    config=SlaConfig,
    paper="Zhang et al. 2025, SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear "
    "Attention (arXiv:2509.24006)",
    summary="pooled block scores: top 5% critical (softmax), bottom 10% skipped, the rest linear attention "
    "through a learnable projection (zero-initialised)",
    bidirectional=True,
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: SlaConfig, *, causal: bool, block_q: int, block_k: int
) -> CompensatedPattern:
    """A :class:`CompensatedPattern` (critical exact, marginal linear); lists per query head,
    ``kv_counts`` int32 ``(B, Hq, n_q_blocks)``. q ``(B, Hq, S, D)``, k ``(B, Hkv, S, D)``."""
    layout = spatial_layout("sla", q, k, config, causal=causal, tile=config.tile)
    batch, q_heads, seq, dim = q.shape
    pooled_q = mean_pool_blocks(layout.permute(q), block_q)
    pooled_k = mean_pool_blocks(layout.permute(k), block_k)
    logits = grouped_matmul(pooled_q, pooled_k)  # (B, Hq, n_q, n_kv); the scale does not change the ranking
    levels = classify_blocks(logits, config.critical, config.negligible)
    levels = levels.masked_fill(text_key_blocks(layout, block_k, q.device), EXACT)
    return CompensatedPattern.from_levels(
        levels, block_q=block_q, block_k=block_k, seq_q=seq, seq_k=seq, causal=False,
        feature_map=config.feature_map, projection=_projection(config, dim, q.device), layout=layout,
    )  # fmt: skip


class SparseLinearAttention(torch.nn.Module):
    """SLA with its learnable projection: ``Proj`` is an ``nn.Linear(head_dim, head_dim)``
    initialised to zero (the paper's initialisation), and :meth:`forward` runs
    ``sa.sparse_attention(q, k, v, "sla", ...)`` with it (non-causal), so ``Proj`` can be fine-tuned.

    ``options`` are the method's (``grid``, ``critical``, ``negligible``, ``feature_map``, ``tile``,
    ``text_tokens``, ``text_position``; not ``projection``); ``block_q`` / ``block_k`` default to
    the released code's 64."""

    def __init__(self, head_dim: int, *, block_q: int = 64, block_k: int = 64, **options) -> None:
        super().__init__()
        check_int("head_dim", head_dim)
        if "projection" in options:
            raise TypeError("SparseLinearAttention holds its projection itself (self.proj); do not pass projection=")
        SlaConfig(**options)  # bad options fail here, not at the first call
        self.proj = torch.nn.Linear(head_dim, head_dim)
        torch.nn.init.zeros_(self.proj.weight)
        torch.nn.init.zeros_(self.proj.bias)
        self.block_q, self.block_k, self.options = block_q, block_k, dict(options)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
        """``(B, Hq, S, D)`` attention output; q ``(B, Hq, S, D)``, k and v ``(B, Hkv, S, D)``."""
        from ..api import sparse_attention

        projection = (self.proj.weight, self.proj.bias)
        return sparse_attention(
            q, k, v, "sla", causal=False, backend=backend, block_q=self.block_q, block_k=self.block_k,
            projection=projection, **self.options,
        )  # fmt: skip
