"""The approximate index of large DuckDB index files (faiss IVF-SQ8, ``stores/ann.py``): made from
``ann.MIN_CHUNKS`` chunks on (lowered here so that small data reaches it), saved in the
version folder under its checksums, updated in place by a refresh, recall against the exact
search, ``where`` filters that still return k chunks; and ``%%rag`` end to end."""

from __future__ import annotations

import numpy as np
import pytest

import nbcustom
from nbcustom.engines.rag import stores
from nbcustom.engines.rag.stores import ann
from nbcustom.errors import NbCustomError
from nbcustom.store import Store, Version

from rag_facts import facts_frame
from test_rag import FIFTY, ids

DIM = 32


def clustered(n: int, seed: int):
    """Unit vectors around 40 centres, as embeddings of a few topics."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    x = centres[rng.integers(0, 40, n)] + 0.35 * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def chunk(i: int) -> dict:
    return {"chunk_id": f"r{i:05d}#0", "row_id": f"r{i:05d}", "position": 0, "hash": f"h{i}", "text": f"text {i}", "metadata": {"n": i % 7}}


def write(folder, chunks, vectors, previous=None, copy=()):
    (folder / "model").mkdir(parents=True)
    writer = stores.create(None if previous else "duckdb", previous, "t", folder / "model", DIM)
    writer.insert(chunks, vectors)
    copied = writer.copy(list(copy)) if copy else 0
    entry, total = writer.finish()
    return Version("t", int(folder.name[1:]), folder, {"kind": "rag", "index": {"store": entry}}), copied, total


def recall(found, vectors_by_position, queries, k=10, among=None) -> float:
    hits = 0
    for q in queries:
        scores = vectors_by_position @ q
        if among is not None:
            mask = np.full(len(scores), -np.inf)
            mask[among] = 0
            scores = scores + mask
        truth = set(np.argsort(-scores)[:k].tolist())
        got = found.search(q, k, among=among)
        assert len(got) == k
        hits += len(truth & {p for p, _ in got})
    return hits / (k * len(queries))


def test_a_large_index_gets_an_ivf_index_that_a_refresh_updates_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(ann, "MIN_CHUNKS", 2_000)
    vectors = clustered(6_000, seed=0)
    queries = clustered(30, seed=1)
    v1, _, total = write(tmp_path / "v1", [chunk(i) for i in range(5_000)], vectors[:5_000])
    entry = v1.manifest["index"]["store"]
    assert total == 5_000 and entry["ann"] == {"type": "faiss-ivf-sq8", "file": "model/index.faiss", "metric": "cosine",
                                               "lists": ann.lists(5_000), "probes": ann.probes(ann.lists(5_000)),
                                               "rerank": {"factor": 2, "at_least": 20}, "trained_on": 5_000}
    assert (v1.path / "model" / "index.faiss").is_file()
    found = stores.open(v1)
    assert found._ann is not None and found._ann.ntotal == 5_000
    assert found._ann.code_size == DIM  # a byte per dimension: the index does not hold the vectors again
    order = [int(c[1:6]) for c in found.chunk_ids]
    assert recall(found, vectors[order], queries) >= 0.95
    exact = [set(np.argsort(-(vectors[order] @ q))[:4].tolist()) for q in queries]  # the same top 4 for 95 % of the questions
    assert sum({p for p, _ in found.search(q, 4)} == top for q, top in zip(queries, exact)) >= 0.95 * len(queries)
    # a filter that keeps 1/7 of the chunks, more than MIN_CHUNKS: the ANN path with faiss's selector
    calls = []
    monkeypatch.setattr(ann, "candidates", lambda *a, candidates=ann.candidates: calls.append(1) or candidates(*a))
    monkeypatch.setattr(ann, "MIN_CHUNKS", 500)
    among = np.asarray([p for p in range(len(order)) if order[p] % 7 == 3])
    assert len(among) > 700 and recall(found, vectors[order], queries[:10], among=among) >= 0.95 and len(calls) == 10
    everything = found.search(queries[0], len(among), among=among)  # more than the probed cells hold: probes widen
    assert sorted(p for p, _ in everything) == sorted(among.tolist())
    monkeypatch.setattr(ann, "MIN_CHUNKS", 2_000)  # a filter that keeps fewer: the exact search over them
    assert recall(found, vectors[order], queries[:5], among=among) == 1.0 and len(calls) == 11

    # a refresh: rows 0-99 gone, 5000-5199 new, the rest copied; the index is updated, not trained again
    keep = [f"r{i:05d}" for i in range(100, 5_000)]
    v2, copied, total = write(tmp_path / "v2", [chunk(i) for i in range(5_000, 5_200)], vectors[5_000:5_200], previous=v1, copy=keep)
    assert (copied, total) == (4_900, 5_100)
    assert v2.manifest["index"]["store"]["ann"]["trained_on"] == 5_000
    refreshed = stores.open(v2)
    assert refreshed._ann.ntotal == 5_100 and set(refreshed._keys.tolist()) == set(range(100, 5_200))
    order = [int(c[1:6]) for c in refreshed.chunk_ids]
    assert recall(refreshed, vectors[order], queries) >= 0.95
    for i in (5_000, 5_123, 4_999):  # a new or kept chunk's own vector finds it first
        assert refreshed.chunk_ids[refreshed.search(vectors[i], 1)[0][0]] == f"r{i:05d}#0"
    assert all(int(refreshed.chunk_ids[p][1:6]) >= 100 for q in queries for p, _ in refreshed.search(q, 10))

    # grown past RETRAIN times its training size: trained again
    monkeypatch.setattr(ann, "RETRAIN", 1)
    v3, _, total = write(tmp_path / "v3", [chunk(i) for i in range(5_200, 6_000)], vectors[5_200:6_000], previous=v2,
                         copy=[f"r{i:05d}" for i in range(100, 5_200)])
    assert total == 5_900 and v3.manifest["index"]["store"]["ann"]["trained_on"] == 5_900


def test_the_scores_are_exact_cosines_and_an_ivf_flat_version_still_searches_and_refreshes(tmp_path, monkeypatch):
    """The 8-bit codes only choose candidates: the scores returned are the full vectors'
    cosines. A version made with IVF-Flat (before the codes) still answers, and its refresh
    trains an IVF-SQ8 index."""
    import faiss

    monkeypatch.setattr(ann, "MIN_CHUNKS", 2_000)
    vectors, queries = clustered(5_000, seed=4), clustered(20, seed=5)
    v1, _, _ = write(tmp_path / "v1", [chunk(i) for i in range(4_000)], vectors[:4_000])
    found = stores.open(v1)
    for q in queries[:5]:
        hits = found.search(q, 10)
        exact = found.matrix[[p for p, _ in hits]] @ (q / np.linalg.norm(q))
        assert np.allclose([s for _, s in hits], exact, atol=1e-6) and list(exact) == sorted(exact, reverse=True)

    def flat(con, total):  # the code of before: IVF-Flat
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, ann.lists(total), faiss.METRIC_INNER_PRODUCT)
        index.train(np.concatenate([v for _, v in ann._batches(con)]))
        return index

    with monkeypatch.context() as old:
        old.setattr(ann, "_trained", flat)
        old.setattr(ann, "TYPE", "faiss-ivf-flat")
        v2, _, _ = write(tmp_path / "v2", [chunk(i) for i in range(4_000)], vectors[:4_000])
    before = stores.open(v2)
    assert before._ann.code_size == 4 * DIM and v2.manifest["index"]["store"]["ann"]["type"] == "faiss-ivf-flat"
    order = [int(c[1:6]) for c in before.chunk_ids]
    assert recall(before, vectors[order], queries) >= 0.95
    v3, copied, total = write(tmp_path / "v3", [chunk(i) for i in range(4_000, 4_100)], vectors[4_000:4_100], previous=v2,
                              copy=[f"r{i:05d}" for i in range(4_000)])
    entry = v3.manifest["index"]["store"]["ann"]
    assert (entry["type"], entry["trained_on"], total) == ("faiss-ivf-sq8", 4_100, 4_100) and stores.open(v3)._ann.code_size == DIM


def test_a_small_index_keeps_the_exact_search(tmp_path):
    vectors = clustered(300, seed=2)
    v1, _, _ = write(tmp_path / "v1", [chunk(i) for i in range(300)], vectors)
    assert "ann" not in v1.manifest["index"]["store"] and not (v1.path / "model" / "index.faiss").exists()
    assert stores.open(v1)._ann is None


def test_rag_end_to_end_with_the_approximate_index(ip, store_dir, monkeypatch):
    """%%rag on 50 rows with MIN_CHUNKS lowered: the manifest names the index, its file is
    under the checksums, answers find the rows, a refresh updates it in place."""
    monkeypatch.setattr(ann, "MIN_CHUNKS", 20)
    ip.user_ns["facts"] = facts_frame(FIFTY)
    ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    v1 = Store(store_dir).get("facts")
    assert v1.manifest["index"]["store"]["ann"]["type"] == "faiss-ivf-sq8"
    assert "model/index.faiss" in v1.manifest["files"]
    tower = "What is the tallest tower in Dunmarrow?"
    assert ids(nbcustom.retrieve("facts", tower, top_k=3, search="vector", store=store_dir).to_dict("records"))[0] == 7
    rows = [r for r in FIFTY if r[0] != 7] + [(51, "The harbor master of Port Ellisande is Gunnar Vey.", "people")]
    ip.user_ns["facts"] = facts_frame(rows)
    ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    v2 = Store(store_dir).get("facts")
    assert v2.manifest["index"]["store"]["ann"]["trained_on"] == 50 and v2.manifest["counts"]["chunks_copied"] == 49
    found = nbcustom.retrieve("facts", ["Who is the harbor master of Port Ellisande?", tower], top_k=5, search="vector", store=store_dir)
    assert found["id"].iloc[0] == 51 and 7 not in found["id"].tolist()
    rare = nbcustom.retrieve("facts", tower, top_k=3, search="vector", where="id IN ('3', '9', '27')", store=store_dir)
    assert sorted(rare["id"]) == [3, 9, 27]  # a --where that keeps k chunks of 50 returns all k

    damaged = v2.path / "model" / "index.faiss"  # one byte changed: refused by its checksum
    content = bytearray(damaged.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    with pytest.raises(NbCustomError, match="model/index.faiss failed its sha256 checksum") as error:
        nbcustom.retrieve("facts", tower, store=store_dir)
    assert "\n" not in str(error.value)


def test_a_refresh_of_a_version_made_before_keys_existed_gives_every_chunk_its_own_key(tmp_path):
    import duckdb

    vectors = clustered(40, seed=3)
    v1, _, _ = write(tmp_path / "v1", [chunk(i) for i in range(30)], vectors[:30])
    with duckdb.connect(str(v1.path / "model" / "index.duckdb")) as con:  # the file as older versions wrote it
        con.execute("ALTER TABLE chunks DROP COLUMN key")
    v2, copied, total = write(tmp_path / "v2", [chunk(i) for i in range(30, 40)], vectors[30:], previous=v1,
                              copy=[f"r{i:05d}" for i in range(30)])
    assert (copied, total) == (30, 40)
    with duckdb.connect(str(v2.path / "model" / "index.duckdb"), read_only=True) as con:
        assert sorted(k for (k,) in con.execute("SELECT key FROM chunks").fetchall()) == list(range(40))


def test_the_index_trains_within_the_writers_memory_limit(tmp_path, monkeypatch):
    """The training sample is larger than the writer's DuckDB may hold, so it must stream
    (a reservoir sample of it ran out of memory at 100,000 real rows)."""
    from nbcustom.engines.rag.stores import duckdb as duckdb_store

    monkeypatch.setattr(ann, "MIN_CHUNKS", 2_000)
    monkeypatch.setattr(duckdb_store, "WRITE_MEMORY", "16MB")
    monkeypatch.setattr(duckdb_store, "READ_MEMORY", "16MB")
    monkeypatch.setattr(ann, "BATCH", 1_000)  # 1.5 MB read at a time, as 5,000 are against the real 32 MB
    monkeypatch.setattr(ann, "TRAIN_PER_LIST", 20)  # a sample of about half the chunks
    n, dim = 20_000, 384  # 31 MB of vectors
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    (tmp_path / "v1" / "model").mkdir(parents=True)
    writer = stores.create("duckdb", None, "t", tmp_path / "v1" / "model", dim)
    for start in range(0, n, 1_000):  # as a build writes them: a slice at a time
        writer.insert([chunk(i) for i in range(start, start + 1_000)], vectors[start : start + 1_000])
    entry, total = writer.finish()
    assert total == n and entry["ann"]["lists"] == ann.lists(n) and entry["ann"]["trained_on"] == n
