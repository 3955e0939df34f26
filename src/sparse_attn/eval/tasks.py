"""Evaluation tasks: deterministic prompt generators of an exact token length, and their scores.

Each task turns ``(tokenizer, length, depth, seed)`` into a :class:`Sample` whose
``input_ids`` are exactly ``length`` tokens, and scores the model's greedy continuation.
Prompts are completion-style (they end where the answer starts), which small base models
follow far more reliably than a question to answer.

* ``passkey``: a 5-digit pass key hidden at ``depth`` in repeated filler sentences; the
  prompt ends "The pass key is"; exact match.
* ``niah``: needle in a haystack of real text: one "secret number of the <key>" at
  ``depth``; exact match.
* ``niah_multikey``: the same with three distractor needles of other keys elsewhere.
* ``niah_multivalue``: four numbers for the same key (the first at ``depth``); the score is
  the fraction of them in the answer.
* ``variable_tracking``: a chain ``VAR A = 12345``, ``VAR B = VAR A``, ... starting at
  ``depth``; the score is the fraction of the chain's variables named in the answer.
* ``perplexity``: the perplexity of the last tokens of a long text given all that precedes
  them (lower is better; no depth).

The needle tasks read real text from :mod:`.haystack` (``pydoc`` by default); perplexity
reads the King James Bible by default.

Each task has a minimum prompt length (:attr:`Task.min_length`): at
least two blocks of the default 128 tokens, so a method has a block it may skip, and at
least twice the task's fixed text (header, needles, question) with the embedded models'
tokenizers, so the haystack is at least as long as everything else, rounded up to a
multiple of 128. Shorter prompts still tokenize but measure neither retrieval from a long
context nor sparsity; the evaluation grid refuses them.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import haystack
from .prompt import Prompt, assemble, text_tokens

GENERATE, PERPLEXITY = "generate", "perplexity"
# Greedy tokens allowed past the expected answer (a space, punctuation, a stray token).
_ANSWER_SLACK = 3

# Word lists for needle keys ("the <adjective> <noun>"); any pair reads as a plain phrase.
_ADJECTIVES = tuple(
    "amber brave calm dusty early faint gentle hollow icy jolly kind lively misty narrow old pale quiet rapid silver"
    " tall urban vivid warm young".split()
)
_NOUNS = tuple(
    "anchor bridge castle desert engine forest garden harbor island journey kettle lantern meadow needle orchard"
    " palace quarry river saddle tower valley window".split()
)
_PASSKEY_HEADER = (
    "Somewhere in the long text below there is a pass key. Memorize it: you will be asked for it at the end."
)
_VARIABLES_HEADER = (
    "Variables are assigned in the text below, some from other variables."
    " Follow them: you will be asked about them at the end."
)
# Repeated filler of the passkey task: plain statements that carry no numbers.
_PASSKEY_FILLER = (
    "The river runs slowly toward the sea.",
    "Clouds drift over the quiet hills.",
    "A farmer walks along the field at dawn.",
    "The town wakes up and the market opens.",
    "Evening comes and the lamps are lit one by one.",
)


@dataclass(frozen=True)
class Sample:
    """One generated case of a task.

    Attributes:
        input_ids: the prompt, exactly ``length`` token ids.
        answers: the expected strings (one for exact match; several for fraction scores).
        needle_spans, needle_depths: where the needles sit (token positions, fraction of the haystack).
        haystack_span: the ``[start, end)`` token positions of the haystack (filler and needles).
        max_new_tokens: greedy tokens to generate (0 for perplexity).
        scored_tokens: perplexity only: how many final tokens are scored.
    """

    task: str
    length: int
    depth: float | None
    seed: int
    input_ids: tuple[int, ...]
    answers: tuple[str, ...]
    needle_spans: tuple[tuple[int, int], ...] = ()
    needle_depths: tuple[float, ...] = ()
    haystack_span: tuple[int, int] = (0, 0)
    max_new_tokens: int = 0
    scored_tokens: int = 0


@dataclass(frozen=True)
class Task:
    """A task: how to generate its samples and score an answer.

    ``kind`` is ``"generate"`` (score a greedy continuation) or ``"perplexity"`` (score the
    prompt's own last tokens); ``uses_depth`` says whether ``depth`` places a needle;
    ``min_length`` is the shortest prompt the evaluation grid runs (module docstring).
    """

    name: str
    kind: str
    uses_depth: bool
    higher_is_better: bool
    haystack: str
    min_length: int
    build: Callable[[Task, object, int, float | None, random.Random], tuple[Prompt, tuple[str, ...], str]]
    score_answer: Callable[[Sample, str], float]

    def make(self, tokenizer, length: int, depth: float | None = None, seed: int = 0) -> Sample:
        """The sample for ``(length, depth, seed)``; the same arguments give the same sample."""
        if self.uses_depth and (depth is None or not 0.0 <= depth <= 1.0):
            raise ValueError(f"task {self.name!r} needs a depth in [0, 1], got {depth!r}")
        depth = depth if self.uses_depth else None
        rng = random.Random(f"{self.name}|{self.haystack}|{length}|{depth}|{seed}")
        prompt, answers, answer_text = self.build(self, tokenizer, length, depth, rng)
        generate = self.kind == GENERATE
        return Sample(
            task=self.name,
            length=length,
            depth=depth,
            seed=seed,
            input_ids=prompt.input_ids,
            answers=answers,
            needle_spans=prompt.needle_spans,
            needle_depths=prompt.needle_depths,
            haystack_span=prompt.haystack_span,
            max_new_tokens=len(text_tokens(tokenizer, " " + answer_text)) + _ANSWER_SLACK if generate else 0,
            scored_tokens=0 if generate else min(256, length // 4),
        )

    def score(self, sample: Sample, output: str) -> float:
        """The score of the decoded greedy continuation ``output`` (generation tasks)."""
        return self.score_answer(sample, output)


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------
def exact_number(sample: Sample, output: str) -> float:
    """1.0 when the first number in ``output`` is the expected one, else 0.0."""
    found = re.search(r"\d+", output)
    return float(found is not None and found.group() == sample.answers[0])


def fraction_found(sample: Sample, output: str) -> float:
    """The fraction of the expected answers that appear in ``output`` as whole words."""
    words = set(re.findall(r"\w+", output))
    return sum(answer in words for answer in sample.answers) / len(sample.answers)


# ---------------------------------------------------------------------------------------
# Prompt builders: (task, tokenizer, length, depth, rng) -> (prompt, answers, answer text)
# ---------------------------------------------------------------------------------------
def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _distinct(draw: Callable[[], str], count: int) -> list[str]:
    values: list[str] = []
    while len(values) < count:
        value = draw()
        if value not in values:
            values.append(value)
    return values


def _key_phrase(rng: random.Random) -> str:
    return f"{rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"


def _build_passkey(task: Task, tokenizer, length: int, depth: float, rng: random.Random):
    key = _number(rng, 5)
    prompt = assemble(
        tokenizer,
        length=length,
        header=_PASSKEY_HEADER,
        sentences=_PASSKEY_FILLER,
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key.")],
        question="\n\nWhat is the pass key? The pass key is",
        rng=rng,
    )
    return prompt, (key,), key


_NIAH_HEADER = (
    "Notes with secret numbers are hidden in the text below."
    " Read it carefully: you will be asked about them at the end."
)


def _needle(key: str, value: str) -> str:
    return f"The secret number of the {key} is {value}."


def _build_niah(task: Task, tokenizer, length: int, depth: float, rng: random.Random, distractors: int = 0):
    keys = _distinct(lambda: _key_phrase(rng), 1 + distractors)
    values = _distinct(lambda: _number(rng, 7), 1 + distractors)
    needles = [(depth, _needle(keys[0], values[0]))]
    needles += [(rng.random(), _needle(key, value)) for key, value in zip(keys[1:], values[1:], strict=True)]
    prompt = assemble(
        tokenizer,
        length=length,
        header=_NIAH_HEADER,
        sentences=haystack.sentences(task.haystack),
        needles=needles,
        question=f"\n\nWhat is the secret number of the {keys[0]}? The secret number of the {keys[0]} is",
        rng=rng,
    )
    return prompt, (values[0],), values[0]


def _build_niah_multikey(task: Task, tokenizer, length: int, depth: float, rng: random.Random):
    return _build_niah(task, tokenizer, length, depth, rng, distractors=3)


def _build_niah_multivalue(task: Task, tokenizer, length: int, depth: float, rng: random.Random, count: int = 4):
    key = _key_phrase(rng)
    values = _distinct(lambda: _number(rng, 7), count)
    depths = [depth] + [rng.random() for _ in values[1:]]
    prompt = assemble(
        tokenizer,
        length=length,
        header=_NIAH_HEADER,
        sentences=haystack.sentences(task.haystack),
        needles=[(d, _needle(key, value)) for d, value in zip(depths, values, strict=True)],
        question=f"\n\nWhat are all the secret numbers of the {key}? The secret numbers of the {key} are",
        rng=rng,
    )
    return prompt, tuple(values), ", ".join(values)


def _build_variable_tracking(task: Task, tokenizer, length: int, depth: float, rng: random.Random, hops: int = 4):
    names = _distinct(lambda: "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)), hops + 1)
    value = _number(rng, 5)
    statements = [f"VAR {names[0]} = {value}."] + [
        f"VAR {name} = VAR {previous}." for previous, name in itertools.pairwise(names)
    ]
    # The chain starts at depth and the later links follow it in order.
    depths = [depth] + sorted(depth + (1.0 - depth) * rng.random() for _ in names[1:])
    prompt = assemble(
        tokenizer,
        length=length,
        header=_VARIABLES_HEADER,
        sentences=haystack.sentences(task.haystack),
        needles=list(zip(depths, statements, strict=True)),
        # Ending on "VAR" makes small models list variable names rather than start a new paragraph.
        question=(
            f"\n\nQuestion: which variables hold the value {value}, directly or through other variables?"
            f"\nAnswer: the variables that hold {value} are VAR"
        ),
        rng=rng,
    )
    return prompt, tuple(names), " ".join(names)


def _build_perplexity(task: Task, tokenizer, length: int, depth: None, rng: random.Random):
    prompt = assemble(
        tokenizer,
        length=length,
        header="",
        sentences=haystack.sentences(task.haystack),
        needles=[],
        question="",
        rng=rng,
    )
    return prompt, (), ""


def _no_answer(sample: Sample, output: str) -> float:
    raise TypeError(f"task {sample.task!r} is scored by perplexity, not by a generated answer")


# name -> (kind, uses_depth, higher_is_better, default haystack, minimum length, builder, score).
# Minimum lengths follow the rule in the module docstring; variable_tracking needs the most
# fixed text (its random variable names split into many tokens).
_SPECS = {
    "passkey": (GENERATE, True, True, "passkey-filler", 256, _build_passkey, exact_number),
    "niah": (GENERATE, True, True, "pydoc", 256, _build_niah, exact_number),
    "niah_multikey": (GENERATE, True, True, "pydoc", 256, _build_niah_multikey, exact_number),
    "niah_multivalue": (GENERATE, True, True, "pydoc", 256, _build_niah_multivalue, fraction_found),
    "variable_tracking": (GENERATE, True, True, "pydoc", 384, _build_variable_tracking, fraction_found),
    "perplexity": (PERPLEXITY, False, False, "kjv", 256, _build_perplexity, _no_answer),
}
TASK_NAMES = tuple(_SPECS)


def get_task(name: str, *, haystack_source: str | None = None) -> Task:
    """The task ``name``; ``haystack_source`` (``pydoc``, ``kjv``, ``essays``) overrides its default text.

    The passkey task always uses its own repeated filler, whatever ``haystack_source``.
    """
    if name not in _SPECS:
        raise ValueError(f"unknown task {name!r}; choose from {list(TASK_NAMES)}")
    kind, uses_depth, higher_is_better, default_source, min_length, build, score = _SPECS[name]
    source = default_source
    if haystack_source is not None and name != "passkey":
        if haystack_source not in haystack.SOURCES:
            raise ValueError(f"unknown haystack {haystack_source!r}; choose one of {list(haystack.SOURCES)}")
        source = haystack_source
    return Task(name, kind, uses_depth, higher_is_better, source, min_length, build, score)
