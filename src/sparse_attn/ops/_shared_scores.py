"""Scores shared between estimator calls on the same q and k, within a scope.

``auto`` runs several settings of one method on the same input (XAttention at three
thresholds): their block scores are identical and only the selection differs. Inside
``with shared_scores():`` an estimator that computes its scores through :func:`memoized` computes
them once per key; outside any scope :func:`memoized` just computes. Keys name the tensors by
storage, shape, strides, dtype and version counter (an in-place change to q or k makes a new
key; the scope holds the keyed tensors, so their storage is not reused under the same key), so
a scope never hands back scores of other data. Values are kept until the scope ends:
scopes are for a handful of calls on one input (``auto``'s candidate loop), not for streaming
whole patterns. Callers must not modify a value they get back.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

__all__ = ["memoized", "shared_scores", "tensor_key"]

T = TypeVar("T")

_SCOPE: ContextVar[dict | None] = ContextVar("sparse_attn_shared_scores", default=None)


@contextmanager
def shared_scores() -> Iterator[None]:
    """A scope in which :func:`memoized` values are computed once per key (nested scopes share the outer one)."""
    if _SCOPE.get() is not None:
        yield
        return
    token = _SCOPE.set({})
    try:
        yield
    finally:
        _SCOPE.reset(token)


def tensor_key(x: torch.Tensor) -> tuple:
    """What identifies ``x``'s values for a scope: storage address, shape, strides, dtype, device, version.

    Tensors made under ``torch.inference_mode()`` keep no version counter: for them the key has
    none, so an in-place change to such a tensor inside a scope would not be seen (``auto``, the
    scope's user, changes neither q nor k).
    """
    version = None if x.is_inference() else x._version
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), version)


def memoized(key: Hashable, compute: Callable[[], T], keep_alive: tuple[torch.Tensor, ...] = ()) -> T:
    """``compute()``, or inside a :func:`shared_scores` scope the value already computed for ``key``.

    ``keep_alive``: the tensors named in ``key`` by :func:`tensor_key`; the scope holds them, so
    their storage cannot be freed and reused by other data under the same key while it lasts.
    """
    memo = _SCOPE.get()
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = (compute(), keep_alive)
    return memo[key][0]
