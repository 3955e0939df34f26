"""The method registry: every estimator is registered here under its name.

A method is a config dataclass (its hyperparameters with the paper's defaults, validated
in ``__post_init__``) and a pure function
``estimate(q, k, config, *, causal, block_q, block_k) -> BlockSparsePattern``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_REGISTRY: dict[str, Method] = {}

# A method that chooses per head (``auto``) stores its per-head labels on the pattern it returns,
# ``pattern.store_plan(HEAD_METHODS, labels)`` with labels a tuple per batch row of a tuple per
# pattern head; ``sa.record`` reports them.
HEAD_METHODS = "head_methods"


@dataclass(frozen=True)
class Method:
    """A registered method: its name, config class, estimator, and the paper it implements."""

    name: str
    config_class: type
    estimate: Callable
    paper: str
    summary: str
    # Bidirectional methods (image/video attention over a layout) refuse causal calls, so causal
    # language-model runs (``sparse-attn eval``'s default method list) leave them out.
    bidirectional: bool = False

    def defaults(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config_class())

    def make_config(self, **options):
        """The config with ``options`` applied; an unknown option raises ``TypeError`` naming it."""
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"method {self.name!r} has no option(s) {unknown}; its options are {sorted(known) or 'none'}"
            )
        return self.config_class(**options)


def register_method(
    name: str, *, config: type, paper: str, summary: str, bidirectional: bool = False
) -> Callable[[Callable], Callable]:
    """Decorator registering ``estimate`` under ``name`` with its config dataclass and citation
    (``bidirectional``: the method takes non-causal calls only)."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config must be a dataclass, got {config!r}")

    def decorate(estimate: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"a method named {name!r} is already registered")
        _REGISTRY[name] = Method(
            name=name,
            config_class=config,
            estimate=estimate,
            paper=paper,
            summary=summary,
            bidirectional=bidirectional,
        )
        return estimate

    return decorate


def get_method(name: str) -> Method:
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def list_methods() -> list[Method]:
    """Every registered method, sorted by name."""
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]
