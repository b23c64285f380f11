"""Which chunks answer a question: vector, keyword (BM25) or hybrid ranking, after an
optional ``--where`` filter on the metadata.

Works on any loaded vector store that offers ``chunk_ids``, ``row_ids``, ``texts``,
``metadata(i)``, ``len()`` and ``search(query_vector, k, among=None)``. The BM25 index is
built from the version's chunk texts when first needed, so it always matches the vectors
the refresh wrote (a few hundred ms for 10,000 chunks).
"""

from __future__ import annotations

import functools
import re
from typing import Sequence

from ...errors import NbCustomError

MODES = ("vector", "keyword", "hybrid")
RRF_K = 60  # reciprocal rank fusion constant (Cormack et al. 2009): damps the top ranks' weight
DEPTH = 50  # candidates each ranking contributes to the fusion
# Keyword candidates scoring under this share of the best one stay out of the fusion: a weak
# match (a common word, a code's shared prefix) should not outvote the embedding's ranking.
KEYWORD_KEEP = 0.7
# Words, numbers, and hyphenated codes both whole and by their parts: "QF-7781" -> qf-7781,
# qf, 7781, so the whole code outscores another code with the same prefix.
WORD = re.compile(r"\w+")
CODE = re.compile(r"\w+(?:-\w+)+")


def words(text: str) -> list[str]:
    """The BM25 terms of ``text``: lower-case words and whole codes, without stop words."""
    text = text.lower()
    stop = _stopwords()
    return [w for w in WORD.findall(text) + CODE.findall(text) if w not in stop]


@functools.cache
def _stopwords() -> frozenset:
    from bm25s.stopwords import STOPWORDS_EN

    return frozenset(STOPWORDS_EN)


class Keywords:
    """BM25 (bm25s) over the chunk texts, positions as in the vector store."""

    def __init__(self, texts: Sequence[str]):
        import bm25s

        self._bm25 = bm25s.BM25()
        self._bm25.index([words(t) for t in texts], show_progress=False)
        self._size = len(texts)

    def scores(self, question: str):
        """The BM25 score of every chunk for ``question`` (0 where no word matches)."""
        import numpy as np

        ids = self._bm25.get_tokens_ids(words(question))
        return self._bm25.get_scores_from_ids(ids) if ids else np.zeros(self._size, dtype=np.float32)


def keyword_ranking(keywords: Keywords, question: str, k: int, among=None) -> list[tuple[int, float]]:
    """(chunk position, BM25 score) of the ``k`` best chunks with a matching word."""
    import numpy as np

    scores = keywords.scores(question)
    positions = np.arange(len(scores)) if among is None else np.asarray(among, dtype=np.int64)
    found = positions[scores[positions] > 0]
    best = found[np.argsort(-scores[found], kind="stable")][:k]
    return [(int(i), float(scores[i])) for i in best]


def fuse(rankings: Sequence[Sequence[int]], k: int) -> list[int]:
    """Reciprocal rank fusion: chunk positions by the sum of 1 / (RRF_K + rank) over the
    rankings; ties keep the first ranking's order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, position in enumerate(ranking, 1):
            fused[position] = fused.get(position, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused, key=lambda p: -fused[p])[:k]


def rank(vectors, keywords, query_vector, question: str, k: int, mode: str, among=None) -> list[tuple[int, float]]:
    """The ``k`` chunks for ``question`` by ``mode``, best first, each with its cosine
    similarity to the question (the score shown with sources, whatever the mode)."""
    if mode == "vector":
        return vectors.search(query_vector, k, among=among)
    depth = max(DEPTH, k)
    found = keyword_ranking(keywords, question, depth, among)
    by_words = [p for p, score in found if score >= KEYWORD_KEEP * found[0][1]]
    if mode == "keyword":
        chosen = by_words[:k]
    else:
        by_meaning = [p for p, _ in vectors.search(query_vector, depth, among=among)]
        chosen = fuse([by_meaning, by_words], k)
    cosine = dict(vectors.search(query_vector, len(chosen), among=chosen)) if chosen else {}
    return [(p, cosine[p]) for p in chosen]


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise NbCustomError(f"--search must be one of {', '.join(MODES)}, not {mode!r}")
    return mode


def where(vectors, predicate: str, columns: Sequence[str]):
    """Positions of the chunks whose row's metadata satisfies the SQL ``predicate``
    (evaluated by DuckDB over one row per chunk; ``id`` is the row id as text)."""
    import duckdb
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame([vectors.metadata(i) for i in range(len(vectors))], columns=list(columns))
    frame["id"] = vectors.row_ids
    frame["__position"] = np.arange(len(vectors))
    con = duckdb.connect()
    try:
        con.register("chunks", frame)
        positions = con.execute(f"SELECT __position FROM chunks WHERE ({predicate})").fetchnumpy()["__position"]
    except duckdb.Error as e:
        have = ", ".join(["id", *columns]) or "none"
        raise NbCustomError(f"--where {predicate!r}: {_first_line(e)[:120]}; use the metadata columns: {have}") from None
    finally:
        con.close()
    return np.asarray(positions, dtype=np.int64)


def _first_line(error: Exception) -> str:
    text = re.sub(r"\s+", " ", str(error).split("\n\nLINE")[0].split("\nLINE")[0]).strip()
    return text[:200]
