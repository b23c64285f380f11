"""Faithfulness: how much of an answer its retrieved chunks support.

An answer is split into sentences. A sentence is supported when one chunk holds every
number of the sentence and at least ``SUPPORTED`` of its content words. Chosen by
measurement against hand labels of 132 answer sentences (tests/faithfulness_labels.py,
tests/benchmarks/bench_rag_faithfulness.py; RESULTS.md): it agreed with the labels more
often than the same count with the question's words allowed, the embedding model's
similarity, or the answering model asked to check each sentence; and it needs no model.
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

SUPPORTED = 0.6  # share of a sentence's content words one chunk must hold
SPLIT = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")
MARKER = re.compile(r"^(?:\d+[.)]|[-*•])$")  # a bare list number or bullet: not a sentence
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
WORD = re.compile(r"[^\W\d_]+")
# Words of the answer's framing ("The answer to the question is ..."), not claims.
FRAMING = frozenset("answer answers question context passage text mentioned called named".split())


def sentences(answer: str) -> list[str]:
    """The sentences of ``answer`` (split at . ! ? and line breaks; bare list numbers left out)."""
    parts = (p.strip() for p in SPLIT.split(answer or ""))
    return [p for p in parts if p and not MARKER.match(p) and (WORD.search(p) or NUMBER.search(p))]


def _number(text: str) -> str:
    text = re.sub(r",(?=\d{3}\b)", "", text)  # 2,500 -> 2500
    return str(float(text)) if re.fullmatch(r"\d+\.\d+", text) else text  # 4.50 -> 4.5


def _stem(word: str) -> str:
    """A crude English stem, enough to match 'reimburses' with 'reimbursed'."""
    for suffix in ("ies", "ing", "es", "ed", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)]
    return word


@functools.cache
def _stopwords() -> frozenset:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN) | FRAMING


def terms(text: str) -> tuple[set[str], set[str]]:
    """(content word stems, numbers) of ``text``."""
    lower = text.lower()
    stop = _stopwords()
    words = {_stem(w) for w in WORD.findall(lower) if w not in stop and len(w) > 1}
    return words, {_number(n) for n in NUMBER.findall(lower)}


def support(sentence: str, chunks: Sequence[str]) -> float:
    """The best share, over ``chunks``, of the sentence's content words that the chunk holds;
    0 for a chunk that lacks one of the sentence's numbers."""
    return _support(sentence, [terms(c) for c in chunks])


def _support(sentence: str, chunk_terms: list[tuple[set[str], set[str]]]) -> float:
    words, numbers = terms(sentence)
    best = 0.0
    for chunk_words, chunk_numbers in chunk_terms:
        if numbers <= chunk_numbers:
            best = max(best, sum(w in chunk_words for w in words) / len(words) if words else 1.0)
    return best


def check(answer: str, chunks: Sequence[str]) -> list[tuple[str, bool]]:
    """Each sentence of ``answer`` and whether ``chunks`` support it (each chunk read once)."""
    chunk_terms = [terms(c) for c in chunks]
    return [(s, _support(s, chunk_terms) >= SUPPORTED) for s in sentences(answer)]


def faithfulness(answer: str, chunks: Sequence[str]) -> float | None:
    """The share of the answer's sentences that ``chunks`` support (None for an empty answer)."""
    checked = check(answer, chunks)
    return sum(ok for _, ok in checked) / len(checked) if checked else None
