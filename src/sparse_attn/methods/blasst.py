"""BLASST: skip candidate blocks whose scores fall below a threshold of the running maximum, inside the kernel.

Paper: Jiayi Yuan, Cameron Shinn, Kai Xu, Jingze Cui, George Klimiashvili, Guangxuan Xiao,
Perkz Zheng, Bo Li, Yuxin Zhou, Zhouhai Ye, Weijie You, Tian Zheng, Dominic Brown, Pengbo Wang,
Markus Hoehnerbach, Richard Cai, Julien Demouth, John D. Owens, Xia Hu, Song Han, Timmy Liu,
Huizi Mao, "BLASST: Dynamic BLocked Attention Sparsity via Softmax Thresholding", 2025,
arXiv:2512.12087.

Rule (the paper's): while FlashAttention walks a query tile's KV blocks with the online
softmax, keeping per row the running maximum ``m`` of the scaled scores, a block whose local
row maxima ``m̃`` satisfy ``m̃ - m < ln λ`` — every weight of the block is below ``λ`` times the
largest weight seen so far — is skipped: no exp, no row sum, no P·V (the paper's decode
kernel also skips the V load; its prefill kernel, like ours, still loads V). Nothing is
estimated beforehand: the decision reuses the softmax statistics the kernel keeps anyway.
Here that makes BLASST a backend capability rather than an estimator: this method's estimate
returns the *candidate* pattern (by default every causal block) wrapped in a
:class:`~sparse_attn.skip_pattern.SkipThresholdPattern` carrying ``λ``, and
:func:`sparse_attn.block_sparse_attention` routes such a pattern to the skipping kernel
(:mod:`sparse_attn.backends.triton_blasst`; on CPU, for gradients and on ``flex`` the same rule
in PyTorch, :mod:`sparse_attn.backends.blasst_reference`). ``sparse_attention(...,
return_info=True)`` reports the density of the blocks actually computed (``info.density``) and
the candidates' (``info.extras["candidate_density"]``).

Defaults. The paper calibrates ``λ`` per model and phase to a target sparsity and finds the
best threshold inversely proportional to the context length, ``λ = a / L`` (deployed
implementations take ``a`` as a "threshold scale factor" and divide it by the KV length).
``threshold=None`` (default) uses that form with ``L = seq_k`` and ``threshold_scale=a=0.8``:
the paper's reported operating points for about 75 % sparsity are ``λ ≈ 1e-4`` at 8K tokens
and ``≈ 1e-5`` at 64K (``a`` ≈ 0.8 and ≈ 0.66); we take the 8K value. These figures were read
from a summary of the paper's calibration section (the full text was not available here);
``a`` is model-specific in the paper, so calibrate it for a model with
``threshold_scale`` or fix ``λ`` with ``threshold``. ``candidates="dense"``: every causally
valid block, the paper's setting (BLASST runs inside dense FlashAttention); any registered
method (name, or ``(name, options)``) may supply a narrower list — the paper also combines
BLASST with XAttention.

Choices where the paper is silent or differs from this code base:

- The decision unit is the pattern's (query block, KV block): the kernel tile is the pattern
  block, so the decision does not change with tuning. The paper decides per FlashAttention
  tile (a warp vote, then a vote across the softmax warpgroup): a block is skipped only when
  every row of the tile agrees, as here.
- Visiting order (the rule depends on it): the candidate entries the causal / bounds rule cuts
  (the diagonal blocks, the sequence tail) first, then the others in ascending order (the
  attention-sink block first). FlashAttention kernels usually walk causal rows from the
  diagonal backwards; we visit the sink right after the diagonal so the two usual maxima
  (local and sink) are known early.
- Rows past the last query, and rows that see no key of a block, do not keep it. A row whose
  running maximum is still ``-inf`` keeps any block it sees a key of, so no output row is empty.
- ``λ`` is compared with the scaled scores (``scale * q·k``), as in the paper's softmax.
- Forward only: the kernel has no backward; inputs that require grad run the rule in PyTorch
  (autograd: skipped blocks get no gradient, as in the paper's sparsity-aware training), with
  one warning.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..checks import check_fraction
from ..pattern import BlockSparsePattern
from ..registry import get_method, register_method
from ..skip_pattern import SkipThresholdPattern

__all__ = ["BlasstConfig", "skip_threshold"]


def _candidate_spec(candidates) -> tuple[str, dict]:
    """``candidates`` as ``(method name, options)``, the options checked against that method's config."""
    if isinstance(candidates, str):
        name, options = candidates, {}
    elif (
        isinstance(candidates, tuple)
        and len(candidates) == 2
        and isinstance(candidates[0], str)
        and isinstance(candidates[1], Mapping)
    ):
        name, options = candidates[0], dict(candidates[1])
    else:
        raise TypeError(f"candidates must be a method name or a (name, options) pair, got {candidates!r}")
    if name == "blasst":
        raise ValueError("candidates cannot be 'blasst' itself")
    get_method(name).make_config(**options)
    return name, options


@dataclass(frozen=True)
class BlasstConfig:
    threshold: float | None = None
    threshold_scale: float = 0.8
    candidates: str | tuple = "dense"

    def __post_init__(self) -> None:
        check_fraction("threshold", self.threshold, allow_none=True, open_low=False)
        scale = self.threshold_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"threshold_scale must be a float, got {type(scale).__name__}")
        if math.isnan(scale) or scale <= 0 or math.isinf(scale):
            raise ValueError(f"threshold_scale must be a positive finite float, got {scale}")
        _candidate_spec(self.candidates)


def skip_threshold(config: BlasstConfig, seq_k: int) -> float:
    """``λ`` for a call with ``seq_k`` keys: ``threshold`` when set, else ``min(1, threshold_scale / seq_k)``."""
    if config.threshold is not None:
        return float(config.threshold)
    return min(1.0, config.threshold_scale / seq_k)


@register_method(
    "blasst",
    config=BlasstConfig,
    paper="Yuan et al. 2025, BLASST: Dynamic BLocked Attention Sparsity via Softmax Thresholding (arXiv:2512.12087)",
    summary="in-kernel skip of candidate blocks whose max score is below running max + ln(threshold)",
)
def estimate(
    q: torch.Tensor, k: torch.Tensor, config: BlasstConfig, *, causal: bool, block_q: int, block_k: int
) -> BlockSparsePattern:
    name, options = _candidate_spec(config.candidates)
    spec = get_method(name)
    candidates = spec.estimate(q, k, spec.make_config(**options), causal=causal, block_q=block_q, block_k=block_k)
    return SkipThresholdPattern.over(candidates, skip_threshold(config, k.shape[2]))
