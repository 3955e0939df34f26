"""The evaluation grid: method variants (a method and its options) and the cases to run.

A method variant is written ``NAME`` (the method's defaults) or
``NAME:OPTION=VALUE[,OPTION=VALUE...]``, e.g. ``xattention:threshold=0.8,stride=16``;
values are Python literals (``0.8``, ``16``, ``None``, ``True``) or else plain strings.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass

from ..registry import get_method
from .tasks import get_task

DENSE = "dense"


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass(frozen=True)
class MethodVariant:
    """A registered method with option overrides (empty: its defaults)."""

    name: str
    options: tuple[tuple[str, object], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MethodVariant:
        """Parse ``NAME`` or ``NAME:OPTION=VALUE,...`` and validate it against the method's config.

        Raises ``ValueError`` for an unknown method, a malformed option or a rejected value.
        """
        name, _, option_text = text.partition(":")
        options = []
        for item in filter(None, (part.strip() for part in option_text.split(","))):
            key, equals, value = item.partition("=")
            if not equals or not key.strip():
                raise ValueError(f"method option {item!r} in {text!r} is not OPTION=VALUE")
            options.append((key.strip(), _literal(value.strip())))
        variant = cls(name.strip(), tuple(sorted(options)))
        variant.validate()
        return variant

    def validate(self) -> None:
        try:
            get_method(self.name).make_config(**dict(self.options))
        except (TypeError, ValueError) as error:
            raise ValueError(str(error)) from error

    @property
    def label(self) -> str:
        """``NAME`` or ``NAME:OPTION=VALUE,...``: how results and plots name this variant."""
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.options)


@dataclass(frozen=True)
class Case:
    """One cell of the grid: a task sample run with one method variant."""

    task: str
    variant: MethodVariant
    length: int
    depth: float | None
    seed: int

    def key(self, model: str, haystack: str) -> str:
        """The identity of this case's result, used to skip finished cases when resuming."""
        return f"{model}|{self.task}|{haystack}|{self.variant.label}|{self.length}|{self.depth}|{self.seed}"


def with_dense(variants: list[MethodVariant]) -> list[MethodVariant]:
    """``variants`` without duplicates, led by plain ``dense`` (the ceiling every run includes)."""
    ordered = [MethodVariant(DENSE)] + list(variants)
    return list(dict.fromkeys(ordered))


def check_lengths(tasks: list[str], lengths: list[int]) -> None:
    """``ValueError`` naming each task's minimum when a length is below it (``Task.min_length``)."""
    problems = []
    for name in tasks:
        minimum = get_task(name).min_length
        short = sorted({length for length in lengths if length < minimum})
        if short:
            problems.append(f"{name} needs at least {minimum} tokens (got {', '.join(map(str, short))})")
    if problems:
        raise ValueError(
            "prompt length too short: " + "; ".join(problems) + ". A shorter prompt cannot hold the task's text "
            "beside a haystack at least as long, in enough 128-token blocks for a method to skip one"
        )


def build_grid(
    tasks: list[str], variants: list[MethodVariant], lengths: list[int], depths: list[float], seeds: list[int]
) -> list[Case]:
    """Every task × variant × length × depth × seed, dense included; variant-major order.

    Tasks without a depth (perplexity) get one case per length and seed. Raises ``ValueError``
    when a length is below a task's minimum (:func:`check_lengths`).
    """
    check_lengths(tasks, lengths)
    cases = []
    for variant, task_name, length, seed in itertools.product(with_dense(variants), tasks, lengths, seeds):
        task_depths = depths if get_task(task_name).uses_depth else [None]
        cases += [Case(task_name, variant, length, depth, seed) for depth in task_depths]
    return cases
