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
    # Head-local methods give each GQA group (its query heads and their KV head) the lists it
    # would get in a call with the other groups left out: ``auto`` then runs a chosen candidate
    # on the groups that chose it only. A method whose rule depends on head numbers or mixes
    # groups (a profile per head, shards by head number, proxies over several groups) is not.
    # A bool, or a function of the method's config for methods where it depends on an option.
    head_local: bool | Callable[[Any], bool] = False

    def is_head_local(self, config) -> bool:
        """Whether this method, with ``config``, is head-local (see ``head_local``)."""
        return bool(self.head_local(config) if callable(self.head_local) else self.head_local)

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
    name: str,
    *,
    config: type,
    paper: str,
    summary: str,
    bidirectional: bool = False,
    head_local: bool | Callable[[Any], bool] = False,
) -> Callable[[Callable], Callable]:
    """Decorator registering ``estimate`` under ``name`` with its config dataclass and citation
    (``bidirectional``: the method takes non-causal calls only; ``head_local``: see
    :attr:`Method.head_local`)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
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
            head_local=head_local,
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
