"""Checks at the public boundary: bad input fails here with a message naming the argument.

One definition of each validator (tensors, integers, fractions, patterns), used by the API,
the pattern type, method configs and integrations alike.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_finite_number(value) -> bool:
    """Whether ``value`` is a finite real number (an int or float, not a bool)."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_bool(name: str, value) -> None:
    """Raise ``TypeError`` naming ``name`` unless ``value`` is a bool (``"false"`` or ``None`` is not one)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_fraction(name: str, value, *, allow_none: bool = False, open_low: bool = True) -> None:
    """Raise unless ``value`` is a float in ``(0, 1]`` (or ``[0, 1]`` when not ``open_low``)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    low_ok = value > 0.0 if open_low else value >= 0.0
    if math.isnan(value) or not low_ok or value > 1.0:
        raise ValueError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value}")


def check_tensor(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape {tuple(x.shape)}")


def check_key_like(q, k, name: str = "k") -> None:
    """``q`` ``(B, Hq, Sq, D)`` and keys ``k`` ``(B, Hkv, Sk, D)`` (named ``name`` in errors): 4-D
    tensors of one dtype and device, the same batch and head_dim, ``Hq`` a positive multiple of ``Hkv``."""
    check_tensor("q", q)
    check_tensor(name, k)
    if k.dtype != q.dtype:
        raise TypeError(f"{name} must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {k.device}")
    if q.device.type == "meta":
        raise ValueError(
            "q is a meta tensor (no data): sparse attention needs the values (the estimators choose "
            "blocks from them), so pass tensors on a CPU or CUDA device"
        )
    batch, q_heads, _, dim = q.shape
    if k.shape[0] != batch:
        raise ValueError(f"{name} must have q's batch size {batch}, got {k.shape[0]}")
    if k.shape[3] != dim:
        raise ValueError(f"{name} must have q's head_dim {dim}, got {k.shape[3]}")
    kv_heads = k.shape[1]
    if kv_heads == 0 or q_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"the number of query heads ({q_heads}) must be a positive multiple of the number of KV heads "
            f"({kv_heads}, {name}'s heads)"
        )


def check_query_key(q, k) -> None:
    """Shape, dtype and device checks shared by attention and estimation (q and k only)."""
    check_key_like(q, k)
    batch, q_heads, seq_q, dim = q.shape
    if seq_q == 0:
        raise ValueError("q has an empty sequence (seq_q == 0)")
    if batch == 0 or dim == 0:
        raise ValueError(f"q must have a nonzero batch and head_dim, got shape {tuple(q.shape)}")
    if k.shape[2] < seq_q:
        raise ValueError(
            f"k must have at least as many positions as q (queries are the last seq_q positions); "
            f"got seq_k={k.shape[2]} < seq_q={seq_q}"
        )


def check_attention_inputs(q, k, v, scale, *, v_dim_may_differ: bool = False) -> float:
    """Validate q, k, v and the scale; return the scale to use (``head_dim ** -0.5`` by default,
    q's head_dim). ``v_dim_may_differ``: v's last dimension may differ from k's (multi-head latent
    attention), for the entry points that take that."""
    check_query_key(q, k)
    check_tensor("v", v)
    if v.dtype != q.dtype:
        raise TypeError(f"v must have q's dtype {q.dtype}, got {v.dtype}")
    if v.device != q.device:
        raise ValueError(f"v must be on q's device {q.device}, got {v.device}")
    if v_dim_may_differ:
        if v.shape[:-1] != k.shape[:-1] or v.shape[-1] == 0:
            raise ValueError(
                f"v must have k's shape {tuple(k.shape)} but for its last dimension (nonzero), got {tuple(v.shape)}"
            )
    elif v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if scale is None:
        return q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return float(scale)


def check_finite(**tensors: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first tensor that holds NaN or Inf (costs one pass and a sync)."""
    for name, x in tensors.items():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
