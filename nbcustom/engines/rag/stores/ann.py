"""The approximate nearest-neighbour index of a large DuckDB index file: faiss's IVF with 8-bit
codes (IVF-SQ8), whose candidates are re-ranked by exact cosine.

k-means splits the unit vectors into ``lists(n)`` cells; a question is compared with the cell
centres, then with the codes of every vector in its ``probes`` nearest cells: one byte per
dimension (a scalar quantizer of the vectors), a quarter of their size. The
best ``max(RERANK * k, RERANK_MIN)`` of them are then scored against the full vectors, which
the search holds anyway (``duckdb.Vectors``), so the scores are exact cosines and only the
candidates are approximate. The codes lose no recall against IVF-Flat's full vectors after
the re-ranking (RESULTS.md), and the index no longer holds the vectors a second time, in the
build or beside the search. It lives in ``model/index.faiss`` beside the DuckDB file, covered
by the version's checksums, its vectors keyed by the chunks' ``key`` column. A refresh reads
the previous version's index, removes the chunks that are gone and adds the new ones (the
cells stay), and trains anew only when the index grew to ``RETRAIN`` times the size it was
trained at (or was made as IVF-Flat, before 2026-12-04). Below ``MIN_CHUNKS`` the exact search
is as fast and no index is made. faiss (not HNSW from usearch or faiss) because, on 2 cores,
an IVF index built 200,000 vectors in 12-16 s against 57-177 s for HNSW, at 0.9-1.0 recall@10
in 1-2 ms (RESULTS.md, ``%%rag`` at a million rows).
"""

from __future__ import annotations

import math
from pathlib import Path

FILE = "index.faiss"
TYPE = "faiss-ivf-sq8"
RERANK, RERANK_MIN = 2, 20  # candidates re-ranked by exact cosine: max(RERANK * k, RERANK_MIN)
MIN_CHUNKS = 20_000
RETRAIN = 4
TRAIN_PER_LIST = 64  # training vectors per cell (faiss asks for at least 39)
BATCH = 5_000  # vectors read from DuckDB at a time (7.5 MB of 384-dim ones)


def lists(n: int) -> int:
    """Cells for ``n`` vectors: 4 sqrt(n), with at least 39 vectors each (faiss's minimum to train)."""
    return max(1, int(min(4 * math.sqrt(n), n / 39, 16_384)))


def probes(n_lists: int) -> int:
    """Cells searched per question: 1/32 of them, at least 16 (recall@10 >= 0.95 on the
    benchmark's real embeddings; RESULTS.md)."""
    return min(n_lists, max(16, n_lists // 32))


def unit(vectors):
    """Rows scaled to length 1 (zero rows left as they are), float32."""
    import numpy as np

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


def _matrix(embedding):
    """An Arrow FixedSizeList column of vectors as one float32 matrix of unit rows."""
    return unit(embedding.flatten().to_numpy(zero_copy_only=False).reshape(len(embedding), embedding.type.list_size))


def _batches(con, where: str = "true"):
    """(keys, unit vectors) of the chunks matching ``where``, BATCH at a time."""
    import numpy as np

    reader = con.sql(f"SELECT key, embedding FROM chunks WHERE {where}").to_arrow_reader(BATCH)
    for batch in reader:
        if batch.num_rows:
            yield batch.column(0).to_numpy().astype(np.int64), _matrix(batch.column(1))


def write(con, folder: Path, total: int, previous: dict | None, first_new_key: int) -> dict | None:
    """The index of the chunks table on ``con`` (``total`` chunks) saved in ``folder``; from the
    ``previous`` entry's index when it can be updated (its chunks copied, ``first_new_key`` and
    up added since). Returns the manifest's ``ann`` entry, or None below MIN_CHUNKS."""
    import faiss

    if total < MIN_CHUNKS:
        return None
    old = (previous or {}).get("ann")
    if old and old["type"] == TYPE and total <= RETRAIN * old["trained_on"]:
        index = faiss.read_index(str(Path(previous["folder"]) / old["file"]))
        kept = con.execute("SELECT key FROM chunks WHERE key < ?", [first_new_key]).fetchnumpy()["key"]
        gone = _gone(con, Path(previous["folder"]) / previous["file"], kept)
        if len(gone):
            index.remove_ids(faiss.IDSelectorBatch(gone))
        trained_on, where = old["trained_on"], f"key >= {int(first_new_key)}"
    else:
        index, trained_on, where = _trained(con, total), total, "true"
    for keys, vectors in _batches(con, where):
        index.add_with_ids(vectors, keys)
    faiss.write_index(index, str(folder / FILE))
    return {"type": TYPE, "file": f"model/{FILE}", "metric": "cosine", "lists": index.nlist, "probes": probes(index.nlist),
            "rerank": {"factor": RERANK, "at_least": RERANK_MIN}, "trained_on": int(trained_on)}


def _trained(con, total: int):
    import faiss
    import numpy as np

    n_lists = lists(total)
    wanted = min(total, TRAIN_PER_LIST * n_lists)
    # A Bernoulli sample streams through DuckDB (a reservoir of a fixed size would be held in
    # the writer's memory, over its limit at 100,000 chunks), into one matrix with room for
    # 10 % more rows than asked for; rows beyond it are left out
    sampled = f" USING SAMPLE {100 * wanted / total:.6f} PERCENT (bernoulli, 7)" if wanted < total else ""
    sample, filled = None, 0
    for batch in con.sql(f"SELECT embedding FROM chunks{sampled}").to_arrow_reader(BATCH):
        vectors = _matrix(batch.column(0))
        if sample is None:
            sample = np.empty((wanted + wanted // 10 + 1, vectors.shape[1]), dtype=np.float32)
        taken = vectors[: len(sample) - filled]
        sample[filled : filled + len(taken)] = taken
        filled += len(taken)
    sample = sample[:filled]
    dim = sample.shape[1]
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, n_lists, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    # codes of the vectors themselves, not of their offsets from the cell centre: training then
    # makes no second copy of the sample (118 MB at 100,000 chunks), and the re-ranking
    # leaves the same recall (RESULTS.md)
    index.by_residual = False
    index.train(sample)
    return index


def _gone(con, previous_file: Path, kept):
    """Keys of the previous version's chunks that this version does not have."""
    import numpy as np

    from .duckdb import _quoted

    con.execute(f"ATTACH '{_quoted(previous_file)}' AS previous_ann (READ_ONLY)")
    try:
        old = con.execute("SELECT key FROM previous_ann.chunks").fetchnumpy()["key"]
    finally:
        con.execute("DETACH previous_ann")
    return np.setdiff1d(old.astype(np.int64), np.asarray(kept, dtype=np.int64))


def load(folder: Path, entry: dict):
    import faiss

    index = faiss.read_index(str(Path(folder) / entry["file"]))
    index.nprobe = entry["probes"]
    return index


def candidates(index, query, k: int, keys=None) -> list[int]:
    """Keys of the ``max(RERANK * k, RERANK_MIN)`` chunks nearest ``query`` by the index's
    scores, to re-rank by exact cosine; only among ``keys`` when given, probing more cells
    until ``k`` of them are found (all cells at worst)."""
    import faiss
    import numpy as np

    q = unit(np.asarray(query, dtype=np.float32)[None])
    probe, selector = index.nprobe, None if keys is None else faiss.IDSelectorBatch(np.asarray(keys, dtype=np.int64))
    wanted, many = (k if keys is None else min(k, len(keys))), max(RERANK * k, RERANK_MIN)
    while True:
        params = faiss.SearchParametersIVF(nprobe=probe, sel=selector) if selector is not None else faiss.SearchParametersIVF(nprobe=probe)
        _, found = index.search(q, many, params=params)
        hits = [int(key) for key in found[0] if key >= 0]
        if len(hits) >= wanted or probe >= index.nlist:
            return hits
        probe = min(index.nlist, probe * 4)
