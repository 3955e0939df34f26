"""Exact-length prompts: a header, a haystack with needles inserted at chosen depths, a question.

Every piece is tokenized on its own and the token lists are concatenated, so the prompt
is a token sequence of exactly the requested length (the model reads these ids; the text
is never re-tokenized). The haystack is a run of whole sentences, each tokenized with a
leading space, cut at the token level (its first sentence loses its head) to fill the
budget left by the other pieces;
needles go in between whole sentences.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

# Sentences tokenized per call while filling a haystack: large enough to be fast, small
# enough not to tokenize far past a short prompt.
_TOKENIZE_CHUNK = 256


@dataclass(frozen=True)
class Prompt:
    """An assembled prompt.

    Attributes:
        input_ids: exactly the requested number of token ids.
        needle_spans: per needle (in the order given), its ``[start, end)`` token positions.
        needle_depths: per needle, the fraction of the haystack's filler tokens before it, in ``[0, 1]``.
        haystack_span: the ``[start, end)`` token positions of the haystack region.
    """

    input_ids: tuple[int, ...]
    needle_spans: tuple[tuple[int, int], ...]
    needle_depths: tuple[float, ...]
    haystack_span: tuple[int, int]


def text_tokens(tokenizer, text: str) -> list[int]:
    """``text``'s token ids without special tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (Gemma's BOS; none for SmolLM2)."""
    plain = text_tokens(tokenizer, "a")
    full = list(tokenizer("a").input_ids)
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


def filler_tokens(tokenizer, sentences: Sequence[str], start: int, budget: int) -> tuple[list[int], list[int]]:
    """At least ``budget`` tokens of whole sentences from ``sentences[start:]`` (wrapping around).

    Returns ``(tokens, starts)``: the concatenated ids of the sentences (each with a
    leading space) and the token offset where each sentence starts.
    """
    if not sentences:
        raise ValueError("the haystack has no sentences")
    tokens: list[int] = []
    starts: list[int] = []
    index = start
    while len(tokens) < budget:
        chunk = [" " + sentences[(index + i) % len(sentences)] for i in range(_TOKENIZE_CHUNK)]
        for ids in tokenizer(chunk, add_special_tokens=False).input_ids:
            if len(tokens) >= budget:
                break
            starts.append(len(tokens))
            tokens += ids
        index += _TOKENIZE_CHUNK
    return tokens, starts


def _insertion_points(boundaries: Sequence[int], depths: Sequence[float], rng: random.Random) -> list[int]:
    """Per needle, a distinct boundary (token offset in the filler, ascending, the last one its
    end) nearest ``depth`` of the filler.

    A needle whose nearest boundary is taken gets the nearest free one; ties of equal
    distance are broken by ``rng`` so no side is favored.
    """
    candidates = sorted(set(boundaries))
    budget = candidates[-1]
    if len(candidates) < len(depths):
        raise ValueError(
            f"the haystack has {len(candidates)} sentence boundaries for {len(depths)} needles; use a longer prompt"
        )
    taken: set[int] = set()
    points = []
    for depth in depths:
        target = depth * budget
        free = [c for c in candidates if c not in taken]
        best = min(free, key=lambda c: (abs(c - target), rng.random()))
        taken.add(best)
        points.append(best)
    return points


def assemble(
    tokenizer,
    *,
    length: int,
    header: str,
    sentences: Sequence[str],
    needles: Sequence[tuple[float, str]],
    question: str,
    rng: random.Random,
) -> Prompt:
    """Build a prompt of exactly ``length`` tokens.

    Layout: the tokenizer's leading special tokens, ``header``, the haystack (sentences from
    a position chosen by ``rng``, cut to fit) with each needle ``(depth, text)`` inserted at
    the sentence boundary nearest ``depth`` of the haystack, then ``question``.
    Raises ``ValueError`` when the fixed pieces alone exceed ``length``.
    """
    prefix = leading_special_tokens(tokenizer) + text_tokens(tokenizer, header)
    needle_ids = [text_tokens(tokenizer, " " + text) for _, text in needles]
    suffix = text_tokens(tokenizer, question)
    budget = length - len(prefix) - sum(map(len, needle_ids)) - len(suffix)
    if budget < 0:
        raise ValueError(f"a {length}-token prompt cannot hold this task's fixed text ({length - budget} tokens)")
    filler, starts = filler_tokens(tokenizer, sentences, rng.randrange(len(sentences)), budget)
    # Cut the surplus off the front: the haystack then ends on a whole sentence, and every
    # boundary but its start (right after the header) is the end of a whole sentence.
    surplus = len(filler) - budget
    filler = filler[surplus:]
    boundaries = [0] + [start - surplus for start in starts if start > surplus] + [budget]
    points = _insertion_points(boundaries, [depth for depth, _ in needles], rng)

    ids = list(prefix)
    haystack_start = len(ids)
    spans: dict[int, tuple[int, int]] = {}
    cursor = 0
    for needle in sorted(range(len(needles)), key=lambda i: points[i]):
        ids += filler[cursor : points[needle]]
        cursor = points[needle]
        spans[needle] = (len(ids), len(ids) + len(needle_ids[needle]))
        ids += needle_ids[needle]
    ids += filler[cursor:]
    haystack_end = len(ids)
    ids += suffix
    if len(ids) != length:
        raise AssertionError(f"assembled {len(ids)} tokens instead of {length}")
    return Prompt(
        input_ids=tuple(ids),
        needle_spans=tuple(spans[needle] for needle in range(len(needles))),
        needle_depths=tuple(point / max(budget, 1) for point in points),
        haystack_span=(haystack_start, haystack_end),
    )
