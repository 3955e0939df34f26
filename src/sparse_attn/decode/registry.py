"""The decode-method registry: methods that pick, per decode step, the KV pages or tokens each KV head reads.

A decode method is a config dataclass (its options with the paper's defaults, validated in
``__post_init__``, always including ``token_budget`` in tokens) and a pure selection function

    select(q, cache, config, *, layer, state) -> DecodeSelection

``q`` ``(B, Hq, D)`` is the step's query, ``cache`` the layer's
:class:`~sparse_attn.decode.cache.PagedKVCache` (the step's own key already appended),
``layer`` the layer's index, and ``state`` a dict shared by the layers of one decode step
(empty at its first layer): layer-stateful methods (TidalDecode) keep the tokens they chose
there. The registry is separate from the prefill one (:mod:`sparse_attn.registry`), whose
methods return block patterns; the entries reuse its :class:`~sparse_attn.registry.Method`
type (``estimate`` holds the selection function) so options are checked the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

from ..registry import Method

__all__ = ["DecodeMethod", "get_decode_method", "list_decode_methods", "register_decode_method"]

_DECODE_REGISTRY: dict[str, DecodeMethod] = {}


@dataclass(frozen=True)
class DecodeMethod(Method):
    """A registered decode method; ``estimate`` is its selection function (see the module docstring)."""

    kind = "decode"

    @property
    def select(self) -> Callable:
        return self.estimate


def register_decode_method(name: str, *, config: type, paper: str, summary: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``select`` under ``name`` with its config dataclass and citation."""
    if not dataclasses.is_dataclass(config) or "token_budget" not in {f.name for f in dataclasses.fields(config)}:
        raise TypeError(f"config must be a dataclass with a token_budget field, got {config!r}")

    def decorate(select: Callable) -> Callable:
        if name in _DECODE_REGISTRY:
            raise ValueError(f"a decode method named {name!r} is already registered")
        _DECODE_REGISTRY[name] = DecodeMethod(
            name=name, config_class=config, estimate=select, paper=paper, summary=summary
        )
        return select

    return decorate


def get_decode_method(name: str) -> DecodeMethod:
    if not isinstance(name, str):
        raise TypeError(f"decode_method must be a str, got {type(name).__name__}")
    if name not in _DECODE_REGISTRY:
        raise ValueError(f"unknown decode method {name!r}; registered decode methods: {sorted(_DECODE_REGISTRY)}")
    return _DECODE_REGISTRY[name]


def list_decode_methods() -> list[DecodeMethod]:
    """Every registered decode method, sorted by name."""
    return [_DECODE_REGISTRY[name] for name in sorted(_DECODE_REGISTRY)]
