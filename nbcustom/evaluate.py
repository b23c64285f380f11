"""Text metrics for generated answers.

``exact_match`` and ``token_f1`` follow the SQuAD convention: ``normalize`` lower-cases and
drops punctuation and articles, so "The Red Mug." and "red mug" count as the same answer.
``rouge_l`` is the reference implementation's (the ``rouge-score`` package), so it compares
with the figures other tools report.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections import Counter
from typing import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})


def normalize(text: str | None) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed."""
    text = (text or "").lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def tokens(text: str | None) -> list[str]:
    """The normalized words of ``text``."""
    return normalize(text).split()


def exact_match(pred: str | None, ref: str | None) -> float:
    """1.0 if the normalized texts are equal, else 0.0."""
    return float(normalize(pred) == normalize(ref))


def token_f1(pred: str | None, ref: str | None) -> float:
    """F1 of the overlapping normalized words (SQuAD answer F1). Two empty texts score 1."""
    p, r = tokens(pred), tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def contains(pred: str | None, ref: str | None) -> float:
    """1.0 if the normalized reference occurs in the normalized prediction."""
    r = normalize(ref)
    return float(bool(r) and f" {r} " in f" {normalize(pred)} ")


def rouge_l(pred: str | None, ref: str | None) -> float:
    """ROUGE-L F1 as ``rouge-score`` computes it (its tokenizer, no stemming; articles
    count, and an empty text scores 0)."""
    return _rouge_scorer().score(ref or "", pred or "")["rougeL"].fmeasure


@functools.cache
def _rouge_scorer():
    from rouge_score import rouge_scorer, tokenizers

    # its tokenizer given, not defaulted: the default is announced through absl, whose first
    # log call puts a stderr handler on the root logger (every library's debug lines in a cell)
    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))


def recall(retrieved: Sequence[str], relevant: Sequence[str]) -> float:
    """Share of the ``relevant`` ids found in ``retrieved`` (recall@K for K retrieved)."""
    wanted = set(relevant)
    return len(wanted.intersection(retrieved)) / len(wanted) if wanted else 0.0


def ndcg(retrieved: Sequence[str], relevant: Sequence[str]) -> float:
    """Normalized discounted cumulative gain of a ranking with binary relevance (nDCG@K for
    K retrieved): 1 when the relevant ids come first, less the lower they are ranked."""
    wanted = set(relevant)
    gain = sum(1.0 / math.log2(rank + 1) for rank, item in enumerate(retrieved, 1) if item in wanted)
    best = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(wanted), len(retrieved)) + 1))
    return gain / best if best else 0.0


def mean(values: Iterable[float]) -> float:
    """The mean, 0.0 for no values."""
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def generation_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ``exact_match``, ``token_f1`` and ``rouge_l`` over paired texts."""
    pairs = list(zip(predictions, references))
    return {
        "exact_match": mean(exact_match(p, r) for p, r in pairs),
        "token_f1": mean(token_f1(p, r) for p, r in pairs),
        "rouge_l": mean(rouge_l(p, r) for p, r in pairs),
    }


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy), capped so a diverged model still prints."""
    return math.exp(min(loss, 50.0))
