"""The public entry points: estimate a pattern, compute block-sparse attention, or both."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import methods as _methods  # noqa: F401  (registers the built-in methods)
from .backends import resolve_backend, run_backend
from .checks import check_attention_inputs, check_bool, check_finite, check_int, check_query_key
from .compensated_pattern import CompensatedPattern, compensated_attention, resolve_compensated_backend
from .masked_pattern import in_layout_order
from .pattern import BlockSparsePattern, check_pattern_fits
from .registry import Method, get_method
from .skip_pattern import SkipThresholdPattern, computed_density, resolve_skip_backend, skip_threshold_attention
from .utils import synchronized_now

DEFAULT_BLOCK = 128


@dataclass
class SparseAttentionInfo:
    """What :func:`sparse_attention` did: the pattern, its density, the backend and timings (ms)."""

    pattern: BlockSparsePattern
    density: float
    backend: str
    estimate_ms: float
    attention_ms: float
    extras: dict = field(default_factory=dict)


@functools.cache
def _keywords(entry_point: Callable) -> tuple[str, ...]:
    """The named parameters of a public entry point (``**options`` excluded)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(
        name for name, parameter in inspect.signature(entry_point).parameters.items() if parameter.kind in kinds
    )


def _method_config(method: str, options: dict, entry_point: Callable) -> tuple[Method, object]:
    """``(method spec, its config from options)``. The entry point's keywords and the method's
    options share one call, so they must not silently overlap: a name that is neither raises
    ``TypeError`` listing both, and so does a method option named like a keyword (the keyword
    would always take the value)."""
    spec = get_method(method)
    fields = sorted(field.name for field in dataclasses.fields(spec.config_class))
    keywords = _keywords(entry_point)
    name = f"{entry_point.__name__}()"
    shadowed = sorted(set(fields) & set(keywords))
    if shadowed:
        raise TypeError(
            f"method {method!r} has option(s) {shadowed} named like keywords of {name}, which would take their "
            f"values; rename the option(s)"
        )
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise TypeError(
            f"method {method!r} has no option(s) {unknown} (its options: {fields or 'none'}) and {name} has no "
            f"keyword of that name (its keywords: {', '.join(keywords)})"
        )
    return spec, spec.make_config(**options)


def _check_flags(**flags) -> None:
    for name, value in flags.items():
        check_bool(name, value)


def estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    method: str = "dense",
    *,
    causal: bool = True,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    **options,
) -> BlockSparsePattern:
    """Run a method's estimator: which KV blocks each query block should attend to.

    ``q`` is ``(B, Hq, Sq, D)``, ``k`` is ``(B, Hkv, Sk, D)`` with ``Sk >= Sq`` (queries are
    the last ``Sq`` positions). ``options`` are the method's hyperparameters (see
    ``sa.get_method(method).defaults()``). The estimate runs without autograd: a pattern is a
    discrete choice, not differentiated.
    """
    check_query_key(q, k)
    check_bool("causal", causal)
    check_int("block_q", block_q)
    check_int("block_k", block_k)
    spec, config = _method_config(method, options, estimate)
    # A pattern is integer data: the block choice is discrete and gets no gradient, so the
    # estimator builds no autograd graph even when q and k require grad.
    with torch.no_grad():
        pattern = spec.estimate(q, k, config, causal=bool(causal), block_q=block_q, block_k=block_k)
    check_pattern_fits(pattern, q, k)
    return pattern


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: BlockSparsePattern,
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    check_inputs_finite: bool = False,
):
    """Attention over exactly the blocks ``pattern`` lists.

    Args:
        q: ``(B, Hq, Sq, D)``; k, v: ``(B, Hkv, Sk, D)``, same dtype and device, ``Hq % Hkv == 0``,
            ``Sk >= Sq`` (queries are the last ``Sq`` positions). Non-contiguous views are accepted.
            v's head dim may differ from q's and k's (multi-head latent attention, e.g. 128 against
            192); the output then has v's. Head dims the CUDA kernels do not take (96, 80, 192, ...),
            and unequal ones, run zero-padded (:func:`padded_head_dim`; exact, with one warning).
        pattern: a :class:`BlockSparsePattern` for ``(Sq, Sk)`` with batch ``1`` or ``B`` and
            heads ``1``, ``Hq`` or ``Hkv``. Checked once (``pattern.validate``) before its first use.
        causal: mask keys after each query's position inside the kept blocks.
        scale: softmax scale, default ``D ** -0.5``.
        backend: ``"auto"`` (on CUDA gluon where it applies, else triton; reference on CPU,
            which compiles nothing), ``"reference"``,
            ``"flex"``, ``"triton"`` (the portable Triton kernel) or ``"gluon"`` (the Hopper kernel).
            An unsupported case runs on a slower correct backend with one warning (see
            :mod:`sparse_attn.backends`).
        return_lse: also return the natural-log log-sum-exp of each query's scores, float32 ``(B, Hq, Sq)``.
        check_inputs_finite: raise ``ValueError`` if q, k or v hold NaN/Inf (one extra pass and a
            host sync). Otherwise every backend propagates them as SDPA does: a NaN/Inf in q row
            ``i``, or in k at a key row ``i`` attends to (in a block its query block keeps and, when
            causal, not after it), enters row ``i``'s softmax, which turns the row non-finite
            unless the score is ``-inf`` (weight 0, as in SDPA); keys a row does not attend to never
            reach it. A NaN/Inf ``v[j, d]`` makes column ``d`` non-finite in every row of every query
            block that keeps ``j``'s KV block, including rows that do not attend to ``j``: their zero
            weight still multiplies it, as in SDPA's fused kernels (there at their own tile size).
            Rows of query blocks that do not keep that block stay finite.

    Returns:
        ``out`` ``(B, Hq, Sq, Dv)`` (v's head dim) in q's dtype, and ``lse`` when ``return_lse``. Both are
        differentiable in q, k and v on every backend (``flex`` on CUDA only; on CPU it falls
        back to ``reference`` with one warning); the pattern is data and gets no gradient.
    """
    scale = check_attention_inputs(q, k, v, scale, v_dim_may_differ=True)
    _check_flags(causal=causal, return_lse=return_lse, check_inputs_finite=check_inputs_finite)
    check_pattern_fits(pattern, q, k)
    if check_inputs_finite:
        check_finite(q=q, k=k, v=v)
    pattern.ensure_valid(causal=bool(causal))
    padded = padded_head_dim(q, v, backend)
    if padded is not None:
        return _zero_padded(q, k, v, pattern, padded, causal=bool(causal), scale=scale, backend=backend,
                            return_lse=return_lse)  # fmt: skip
    if isinstance(pattern, CompensatedPattern):
        # Pooled / linear blocks (psa, sla) change what is computed for skipped blocks: its own routing.
        options = dict(causal=bool(causal), scale=scale, backend=backend, return_lse=return_lse)
        return compensated_attention(q, k, v, pattern, **options)
    if isinstance(pattern, SkipThresholdPattern):
        # Which candidates run is decided inside the kernel (blasst): its own routing.
        options = dict(causal=bool(causal), scale=scale, backend=backend, return_lse=return_lse)
        return skip_threshold_attention(q, k, v, pattern, **options)
    name = resolve_backend(backend, q, k, v, pattern, causal=bool(causal), return_lse=return_lse)
    options = dict(causal=bool(causal), scale=scale, return_lse=return_lse)
    # A pattern over a layout's tile order (spatial methods) runs on q, k, v in that order.
    return in_layout_order(pattern, lambda *qkv: run_backend(name, *qkv, pattern, **options), q, k, v)


# Head dims the CUDA kernels take (Triton; Gluon and FA4 a subset); others are zero-padded to the next.
KERNEL_HEAD_DIMS = (16, 32, 64, 128, 256)


def padded_head_dim(q: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> int | None:
    """The head dim q, k and v are zero-padded to before a backend runs, or ``None`` when they run
    as they are: v's head dim differs from q's (multi-head latent attention: both go to the larger),
    or a head dim the kernels do not take (96, 80, 192: to the next of :data:`KERNEL_HEAD_DIMS`,
    up to 256) where a kernel runs: on CUDA, or with a kernel backend named (the reference
    backend, which runs on the CPU, takes any head dim)."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    target = max(qk_dim, v_dim)
    if q.device.type == "cuda" or backend not in ("auto", "reference"):
        target = next((dim for dim in KERNEL_HEAD_DIMS if dim >= target), target)
    return None if target == qk_dim == v_dim else target


def _pad_head_dims(q, k, v, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v zero-padded to head dim ``dim`` (differentiable: the padding's gradient is dropped).
    Exact: zero columns add nothing to the scores and give zero output columns. Says so once."""
    qk_dim, v_dim = q.shape[-1], v.shape[-1]
    warnings.warn(
        f"sparse_attn: head dims q/k {qk_dim}, v {v_dim} run zero-padded to {dim}"
        f"{' for the CUDA kernels' if q.device.type == 'cuda' else ''} (exact; the zero columns cost their work)",
        stacklevel=4,
    )
    return tuple(x if x.shape[-1] == dim else F.pad(x, (0, dim - x.shape[-1])) for x in (q, k, v))


def _zero_padded(q, k, v, pattern, dim: int, *, causal: bool, scale: float, backend: str, return_lse: bool):
    """:func:`block_sparse_attention` on q, k, v zero-padded to head dim ``dim``, with the scale
    of the real head dim; the output's padding columns dropped."""
    v_dim = v.shape[-1]
    q, k, v = _pad_head_dims(q, k, v, dim)
    result = block_sparse_attention(
        q, k, v, pattern, causal=causal, scale=scale, backend=backend, return_lse=return_lse
    )
    out, lse = result if return_lse else (result, None)
    out = out[..., :v_dim].contiguous()
    return (out, lse) if return_lse else out


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: str = "dense",
    *,
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    return_info: bool = False,
    check_inputs_finite: bool = False,
    **options,
):
    """Estimate a pattern with ``method`` and compute attention over it.

    Shapes, ``causal``, ``scale``, ``backend`` and ``check_inputs_finite`` (checked once,
    before estimating) as in :func:`block_sparse_attention`; ``block_q`` / ``block_k`` as in
    :func:`estimate`. ``options`` go to the method's config (see
    ``sa.get_method(method).defaults()``); a name that is neither an option of the method nor
    a keyword of this function raises ``TypeError`` listing both. With ``return_info=True``
    returns ``(out, SparseAttentionInfo)``; the timings then synchronize the device around each
    stage. ``out`` is differentiable in q, k and v; the estimate is not (its choice of blocks is
    discrete: gradients flow through the attention over the chosen blocks only).
    """
    scale = check_attention_inputs(q, k, v, scale, v_dim_may_differ=True)
    _check_flags(causal=causal, return_info=return_info, check_inputs_finite=check_inputs_finite)
    # Options are checked here and read again by estimate: one-shot iterators (a generator of
    # candidates) become tuples so that both see the same values.
    options = {name: tuple(value) if isinstance(value, Iterator) else value for name, value in options.items()}
    _method_config(method, options, sparse_attention)
    if check_inputs_finite:
        check_finite(q=q, k=k, v=v)
    start = synchronized_now(q.device) if return_info else 0.0
    pattern = estimate(q, k, method, causal=causal, block_q=block_q, block_k=block_k, **options)
    if not return_info:
        return block_sparse_attention(q, k, v, pattern, causal=causal, scale=scale, backend=backend)
    estimated = synchronized_now(q.device)
    extras = {}
    v_dim, padded = v.shape[-1], padded_head_dim(q, v, backend)
    if padded is not None:  # as block_sparse_attention does, here before the backend is named
        q, k, v = _pad_head_dims(q, k, v, padded)
    if isinstance(pattern, SkipThresholdPattern):
        # The density is that of the blocks the kernel actually computed (extras: the candidates').
        pattern.ensure_valid(causal=bool(causal))
        name = resolve_skip_backend(backend, q, k, v, pattern)
        options = dict(causal=bool(causal), scale=scale, backend=name, return_computed=True)
        out, computed = skip_threshold_attention(q, k, v, pattern, **options)
        density = computed_density(pattern, computed, causal=bool(causal))
        extras["candidate_density"] = pattern.density(causal=causal)
    elif isinstance(pattern, CompensatedPattern):
        pattern.ensure_valid(causal=bool(causal))
        name = resolve_compensated_backend(backend, q, k, v, pattern, return_lse=False)
        out = block_sparse_attention(q, k, v, pattern, causal=causal, scale=scale, backend=name)
        density = pattern.density(causal=causal)  # the exact blocks; extras: the compensated ones
        extras["compensated_density"] = pattern.compensated_density()
    else:
        name = resolve_backend(backend, q, k, v, pattern, causal=bool(causal), return_lse=False)
        out = block_sparse_attention(q, k, v, pattern, causal=causal, scale=scale, backend=name)
        density = pattern.density(causal=causal)
    if padded is not None:
        out = out[..., :v_dim].contiguous()
    finished = synchronized_now(q.device)
    info = SparseAttentionInfo(
        pattern=pattern,
        density=density,
        backend=name,
        estimate_ms=(estimated - start) * 1e3,
        attention_ms=(finished - estimated) * 1e3,
        extras=extras,
    )
    return out, info
