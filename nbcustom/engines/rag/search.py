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


def keyword_ranking(scores, k: int, among=None) -> list[tuple[int, float]]:
    """(chunk position, BM25 score) of the ``k`` best chunks with a matching word, from the
    BM25 ``scores`` of every chunk."""
    import numpy as np

    if among is None:
        found = np.flatnonzero(scores > 0)
    else:
        among = np.asarray(among, dtype=np.int64)
        found = among[scores[among] > 0]
    if len(found) > k:  # a long question matches most chunks: keep the k best before sorting
        values = scores[found]
        kth = np.partition(values, len(values) - k)[len(values) - k]
        tied = values == kth
        found = found[(values > kth) | (tied & (np.cumsum(tied) <= k - int((values > kth).sum())))]  # the first of the tied, as a stable sort
    best = found[np.argsort(-scores[found], kind="stable")]
    return [(int(i), float(scores[i])) for i in best]


def fuse(rankings: Sequence[Sequence[int]], k: int) -> list[tuple[int, float]]:
    """Reciprocal rank fusion: (chunk position, fused score) by the sum of 1 / (RRF_K + rank)
    over the rankings, best first; ties keep the first ranking's order."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, position in enumerate(ranking, 1):
            fused[position] = fused.get(position, 0.0) + 1.0 / (RRF_K + rank)
    return sorted(fused.items(), key=lambda item: -item[1])[:k]


def rank(vectors, keywords, query_vector, question: str, k: int, mode: str, among=None) -> list[tuple[int, dict]]:
    """The ``k`` chunks for ``question`` by ``mode``, best first, each with its scores:
    ``score``, the one that ranked it (cosine similarity, BM25, or the fused score of
    hybrid), and for keyword and hybrid search both parts, ``vector_score`` (cosine) and
    ``keyword_score`` (BM25, 0 where no word matches)."""
    if mode == "vector":
        return [(p, {"score": s}) for p, s in vectors.search(query_vector, k, among=among)]
    depth = max(DEPTH, k)
    bm25 = keywords.scores(question)
    found = keyword_ranking(bm25, depth, among)
    by_words = [p for p, score in found if score >= KEYWORD_KEEP * found[0][1]]
    if mode == "keyword":
        chosen = [(p, float(bm25[p])) for p in by_words[:k]]
    else:
        by_meaning = [p for p, _ in vectors.search(query_vector, depth, among=among)]
        chosen = fuse([by_meaning, by_words], k)
    cosine = dict(vectors.search(query_vector, len(chosen), among=[p for p, _ in chosen])) if chosen else {}
    return [(p, {"score": s, "vector_score": cosine[p], "keyword_score": float(bm25[p])}) for p, s in chosen]


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
