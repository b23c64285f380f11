"""RAG performance of nbcustom (``nbcustom.rag`` = the ``%%rag`` path, ``RagIndex.retrieve``)
against plain llama-index with the same local embedding model, measured side by side in
one run. Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_rag.py [--rows 2000] [--refresh-rows 10000]
        [--retrieval-chunks 100000] [--queries 50] [--baseline-queries 10] [--repeat 1]
        [--backend-chunks 100000] [--vector-store postgresql://USER@HOST:PORT/DB]
        [--only build,refresh,retrieval,backends]

Targets (issue 7):
  build      nbcustom's build throughput (rows/s, whole run: chunking, embedding, DuckDB
             vectors, commit) >= 1.0x plain ``VectorStoreIndex.from_documents`` with
             ``HuggingFaceEmbedding`` on the same MiniLM folder (its defaults, chunk size set
             like nbcustom's). Both models are loaded and warmed up before timing.
  refresh    refreshing 10,000 rows after 1 % of them changed costs <= 5 % of the full
             build of those rows (both through nbcustom), embedding only the ~100 changed rows.
  retrieval  ``RagIndex.retrieve`` p50 < 50 ms at 100,000 chunks, query embedding included.
             The 100,000 chunks are NOT embedded for real (too slow on 2 CPU cores): a real
             small index is built, then its vector table is filled up with random unit
             vectors (with ids, hashes, texts and metadata like real rows') through
             ``rag_store.insert``. Baseline: llama-index's default ``SimpleVectorStore``
             (``VectorStoreIndex(nodes with the same embeddings)`` then
             ``as_retriever().retrieve``), also query embedding included.
  backends   the DuckDB file against PostgreSQL + pgvector (issue 16) at 100,000 chunks:
             build (writing the chunks and their vectors and indexing them: what a %%rag
             build does after embedding, which costs the same for both), refresh (1 % of the
             rows new, the other 99 % copied from the previous version, index built again)
             and ``RagIndex.retrieve`` p50, query embedding included. Synthetic vectors around
             200 topics, the same for both; pgvector's top 4 is compared with DuckDB's exact
             top 4 for query vectors drawn like the chunks'.
             The server is started by pgserver (as in the tests) unless --vector-store names one.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHUNK_SIZE, CHUNK_OVERLAP = 512, 64  # nbcustom's defaults, given to llama-index too
TOPICS = ["billing", "shipping", "returns", "accounts", "security", "warranty", "stores", "staff"]
WORDS = ("parcel invoice refund password locker courier warehouse receipt voucher ticket battery charger "
         "screen keyboard printer router cable adapter manual warranty discount member delivery store").split()
NAMES = "Abel Brix Cato Dima Esko Fenna Gorm Hale Ines Jory Lotte Mads Nyla Orrin Pell Runa Sten Tove".split()
CITIES = "Dunmarrow Quenville Ellisande Harrowgate Lindqvist Marrowby Ostrava Penhallow".split()


def frame(n: int, seed: int = 0, start: int = 0):
    """``n`` short rows (one or two sentences, ~25 words): id, text, topic."""
    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for i in range(start, start + n):
        a, b, c = rng.sample(WORDS, 3)
        rows.append({
            "id": i,
            "text": f"Record {i}: {rng.choice(NAMES)} from the {rng.choice(CITIES)} branch reported that the {a} "
                    f"and the {b} were handled on day {rng.randint(1, 365)}. The {c} was checked by {rng.choice(NAMES)}.",
            "topic": rng.choice(TOPICS),
        })
    return pd.DataFrame(rows)


def embed_folder() -> str:
    from nbcustom import models

    return models.resolve_embedding(None)


# --- plain llama-index ---------------------------------------------------------------------
def plain_embedder():
    """What a llama-index user writes: HuggingFaceEmbedding on the model folder, defaults."""
    from llama_index.core import Settings
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embed_model = HuggingFaceEmbedding(model_name=embed_folder())
    Settings.embed_model = embed_model
    Settings.chunk_size, Settings.chunk_overlap = CHUNK_SIZE, CHUNK_OVERLAP
    embed_model.get_text_embedding_batch(["warm up the model", "a second text"])
    return embed_model


def plain_build(rows, embed_model) -> float:
    from llama_index.core import Document, Settings, VectorStoreIndex

    started = time.perf_counter()
    docs = [Document(id_=str(r.id), text=r.text, metadata={"topic": r.topic}) for r in rows.itertuples(index=False)]
    VectorStoreIndex.from_documents(docs, embed_model=embed_model)
    assert Settings.chunk_size == CHUNK_SIZE
    return time.perf_counter() - started


# --- nbcustom ------------------------------------------------------------------------------
def nbc_build(rows, store: Path, name: str = "bench"):
    import nbcustom

    started = time.perf_counter()
    version = nbcustom.rag(name, rows, store=store, ui="none", metadata="topic", chunk_size=CHUNK_SIZE, chunk_overlap=CHUNK_OVERLAP)
    return time.perf_counter() - started, version


def nbc_warm_up(scratch: Path) -> None:
    """Load the embedding model, convert/resolve the LLM once, import everything a build uses."""
    nbc_build(frame(20, seed=99), scratch / "warm")


# --- the three measurements ----------------------------------------------------------------
def bench_build(n: int, repeat: int, scratch: Path) -> bool:
    rows = frame(n)
    embed_model = plain_embedder()
    nbc_warm_up(scratch)
    ratios = []
    for run in range(repeat):
        plain_s = plain_build(rows, embed_model)
        nbc_s, version = nbc_build(rows, scratch / f"build{run}")
        counts = version.manifest["counts"]
        assert counts["embedded"] == n, counts
        ratio = (n / nbc_s) / (n / plain_s)
        ratios.append(ratio)
        print(
            f"build run {run + 1}: {n} rows ({counts['chunks']} chunks) | llama-index from_documents {plain_s:6.2f}s "
            f"= {n / plain_s:6.1f} rows/s | nbcustom.rag {nbc_s:6.2f}s = {n / nbc_s:6.1f} rows/s | ratio {ratio:.2f}x"
        )
    ratio = statistics.median(ratios)
    ok = ratio >= 1.0
    print(f"build throughput: nbcustom {ratio:.2f}x llama-index (target >= 1.0x): {'PASS' if ok else 'FAIL'}")
    return ok


def bench_refresh(n: int, scratch: Path) -> bool:
    from nbcustom.engines.rag import models as rag_models

    nbc_warm_up(scratch)
    rows = frame(n, seed=1)
    store = scratch / "refresh"
    full_s, v1 = nbc_build(rows, store)
    changed = rows.copy()
    picked = random.Random(2).sample(range(n), max(1, n // 100))
    changed.loc[picked, "text"] = changed.loc[picked, "text"] + " Update: the record was corrected."
    before = rag_models.EMBED_CALLS["documents"]
    refresh_s, v2 = nbc_build(changed, store)
    embedded_chunks = rag_models.EMBED_CALLS["documents"] - before
    counts = v2.manifest["counts"]
    share = refresh_s / full_s
    ok = share <= 0.05 and counts["embedded"] == len(picked)
    print(
        f"refresh: full build of {n} rows {full_s:6.2f}s ({v1.manifest['counts']['chunks']} chunks) | refresh after "
        f"{len(picked)} changed rows {refresh_s:6.2f}s: {counts['embedded']} rows embedded ({embedded_chunks} chunks), "
        f"{counts['chunks_copied']} chunks copied, {counts['unchanged']} unchanged"
    )
    print(f"refresh cost: {share:.1%} of a full build (target <= 5%, ~{len(picked)} rows embedded): {'PASS' if ok else 'FAIL'}")
    return ok


def fill_index(store: Path, name: str, total: int, seed: int = 3) -> int:
    """Top the committed index ``name`` up to ``total`` chunks of random unit vectors, through
    ``rag_store.insert`` (checksums renewed with ``Store.update``). Returns how many were added."""
    import numpy as np

    from nbcustom.engines.rag.stores import duckdb as rag_store
    from nbcustom.store import Store

    s = Store(store)
    version = s.get(name)
    path = version.model_dir / rag_store.FILE
    dim = int(version.manifest["index"]["dim"])
    have = len(rag_store.Vectors({"folder": path.parent, "file": path.name}))
    extra = max(0, total - have)
    rng = np.random.default_rng(seed)
    texts = frame(1000, seed=seed, start=10_000_000)

    def write(folder: Path) -> None:
        con = __import__("duckdb").connect(str(folder / "model" / rag_store.FILE))
        try:
            for start in range(0, extra, 20_000):
                count = min(20_000, extra - start)
                vectors = rng.standard_normal((count, dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                chunks = []
                for i in range(start, start + count):
                    row_id = str(1_000_000 + i)
                    sample = texts.iloc[i % len(texts)]
                    chunks.append({
                        "chunk_id": f"{row_id}#0", "row_id": row_id, "position": 0, "hash": f"{i:064x}",
                        "text": sample["text"], "metadata": {"topic": sample["topic"]},
                    })
                rag_store.insert(con, chunks, vectors, have + start)  # keys after the real chunks
        finally:
            rag_store.close(con)

    s.update(name, version.version, write=write)
    return extra


def bench_retrieval(chunks: int, queries: int, baseline_queries: int, scratch: Path) -> bool:
    import numpy as np

    import nbcustom
    from nbcustom.engines.rag.stores import duckdb as rag_store

    store = scratch / "retrieval"
    nbc_build(frame(200, seed=4), store, "big")
    added = fill_index(store, "big", chunks)
    questions = [f"Who checked the {random.Random(q).choice(WORDS)} at the {random.Random(q + 7).choice(CITIES)} branch on day {q}?"
                 for q in range(max(queries, baseline_queries) + 1)]

    index = nbcustom.load("big", store=store)
    assert len(index.vectors) == chunks, len(index.vectors)
    index.retrieve(questions[-1:], 4)  # warm up: models, retriever, first matrix product
    times = []
    for q in questions[:queries]:
        started = time.perf_counter()
        found = index.retrieve([q], 4)
        times.append(time.perf_counter() - started)
        assert len(found[0]) == 4
    nbc_p50 = statistics.median(times) * 1000
    # where the time goes: the query embedding alone, and nbcustom's vector search alone
    embed_model, embed_times, search_times = index.embed_model(), [], []
    for q in questions[:queries]:
        started = time.perf_counter()
        vector = embed_model.get_query_embedding(q)
        embed_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        index.vectors.search(vector, 4)
        search_times.append(time.perf_counter() - started)
    embed_p50, search_p50 = statistics.median(embed_times) * 1000, statistics.median(search_times) * 1000

    # the same vectors (normalized, as nbcustom ranks them) in llama-index's default store
    from llama_index.core import VectorStoreIndex
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    vectors = rag_store.Vectors({"folder": store / "big" / f"v{nbcustom.Store(store).active_version('big')}" / "model", "file": rag_store.FILE})
    embed_model = plain_embedder()
    started = time.perf_counter()
    nodes = [
        TextNode(
            id_=vectors.chunk_ids[i], text=vectors.texts[i], metadata=vectors.metadata(i), embedding=vectors.matrix[i].tolist(),
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=vectors.row_ids[i])},
        )
        for i in range(len(vectors))
    ]
    plain_index = VectorStoreIndex(nodes, embed_model=embed_model)
    setup_s = time.perf_counter() - started
    retriever = plain_index.as_retriever(similarity_top_k=4)
    retriever.retrieve(questions[-1])
    plain_times = []
    for q in questions[:baseline_queries]:
        started = time.perf_counter()
        hits = retriever.retrieve(q)
        plain_times.append(time.perf_counter() - started)
        assert len(hits) == 4
    plain_p50 = statistics.median(plain_times) * 1000
    # both rank the same chunks first
    same = [s["id"] for s in index.retrieve([questions[0]], 4)[0]] == [int(h.node.ref_doc_id) for h in retriever.retrieve(questions[0])]
    ok = nbc_p50 < 50
    print(
        f"retrieval at {chunks} chunks ({chunks - added} embedded for real, {added} random unit vectors): "
        f"nbcustom RagIndex.retrieve p50 {nbc_p50:6.1f} ms (p90 {np.percentile(times, 90) * 1000:.1f} ms, {queries} queries; "
        f"alone: query embedding p50 {embed_p50:.1f} ms, vector search p50 {search_p50:.1f} ms) | "
        f"llama-index SimpleVectorStore p50 {plain_p50:7.1f} ms ({baseline_queries} queries; building its index "
        f"from nodes {setup_s:.1f}s) | {plain_p50 / nbc_p50:.1f}x faster | same 4 rows found: {same}"
    )
    print(f"retrieval p50: {nbc_p50:.1f} ms (target < 50 ms): {'PASS' if ok else 'FAIL'}")
    return ok


def random_chunks(rows: range, dim: int, seed: int, tag: str = "") -> tuple[list[dict], "np.ndarray"]:
    """One chunk per row id in ``rows``: texts and metadata like real rows', and unit vectors
    spread around 200 random topics, as text embeddings cluster. (Uniformly random vectors
    in 384 dimensions have no near neighbours to speak of: all cosines are about 0, and an
    HNSW graph over them finds the true top 4 only a fraction of the time.)"""
    import numpy as np

    topics = np.random.default_rng(0).standard_normal((200, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    vectors = topics[rng.integers(0, len(topics), len(rows))] + 0.08 * rng.standard_normal((len(rows), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    texts = frame(1000, seed=seed, start=10_000_000)
    chunks = []
    for i in rows:
        sample = texts.iloc[i % len(texts)]
        chunks.append({"chunk_id": f"{i}#0", "row_id": str(i), "position": 0, "hash": f"{tag}{i:060x}",
                       "text": sample["text"] + tag, "metadata": {"topic": sample["topic"]}})
    return chunks, vectors


def write_version(store: Path, name: str, location, chunks, vectors, dim: int, previous=None, copy_rows=()):
    """Commit a RAG version whose vectors are given, through the store interface as ``%%rag``
    writes one; returns the version and the seconds spent writing (and copying) vectors."""
    from nbcustom.engines.rag import stores
    from nbcustom.store import Store

    with Store(store).build(name, "rag") as build:
        started = time.perf_counter()
        writer = stores.create(location, previous, name, build.model_dir, dim)
        build.on_abort.append(writer.discard)
        writer.insert(chunks, vectors)
        copied = writer.copy(list(copy_rows)) if copy_rows else 0
        entry, total = writer.finish()
        seconds = time.perf_counter() - started
        build.manifest.update({
            "options": {"top_k": 4}, "index": {"id_type": "int", "dim": dim, "store": entry},
            "counts": {"chunks": total, "chunks_copied": copied},
        })
    return Store(store).get(name), seconds


def bench_backends(chunks: int, queries: int, scratch: Path, url: str | None) -> None:
    import contextlib
    import sys

    import numpy as np

    import nbcustom

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/: postgres.py
    from postgres import start

    dim = 384
    questions = [f"Who checked the {random.Random(q).choice(WORDS)} at the {random.Random(q + 7).choice(CITIES)} branch on day {q}?"
                 for q in range(queries + 1)]
    probes = random_chunks(range(queries), dim, seed=7)[1]
    print(f"backends at {chunks} chunks (synthetic vectors around 200 topics; embedding excluded, it costs the same for both; {queries} queries):")
    with (contextlib.nullcontext(None) if url else start()) as server:
        location = {"duckdb": "duckdb", "pgvector": url or server.url(password=True)}
        found = {}
        for backend, where in location.items():
            store = scratch / f"backend-{backend}"
            first, vectors = random_chunks(range(chunks), dim, seed=5)
            v1, build_s = write_version(store, "big", where, first, vectors, dim)
            changed = chunks // 100
            new, new_vectors = random_chunks(range(changed), dim, seed=6, tag=" (corrected)")
            del first, vectors
            v2, refresh_s = write_version(store, "big", None, new, new_vectors, dim, previous=v1,
                                          copy_rows=[str(i) for i in range(changed, chunks)])
            assert v2.manifest["counts"] == {"chunks": chunks, "chunks_copied": chunks - changed}, v2.manifest["counts"]
            started = time.perf_counter()
            index = nbcustom.load("big", store=store)
            open_s = time.perf_counter() - started
            assert len(index.vectors) == chunks
            index.retrieve(questions[-1:], 4)  # warm up: models, retriever, connections
            times, search_times, found[backend] = [], [], []
            for q in questions[:queries]:
                started = time.perf_counter()
                index.retrieve([q], 4)
                times.append(time.perf_counter() - started)
            for vector in probes:  # query vectors like the chunks' (the questions' are far from all topics)
                started = time.perf_counter()
                found[backend].append([i for i, _ in index.vectors.search(vector, 4)])
                search_times.append(time.perf_counter() - started)
            print(
                f"  {backend:8s} build {build_s:7.1f}s | refresh ({changed} rows new, {chunks - changed} copied) {refresh_s:7.1f}s | "
                f"open {open_s:5.1f}s | RagIndex.retrieve p50 {statistics.median(times) * 1000:6.1f} ms "
                f"(p90 {np.percentile(times, 90) * 1000:.1f} ms) | vector search alone p50 {statistics.median(search_times) * 1000:6.1f} ms",
                flush=True,
            )
            del index
    recall = np.mean([len(set(a) & set(b)) / 4 for a, b in zip(found["duckdb"], found["pgvector"])])
    print(f"  pgvector's top 4 (HNSW) against DuckDB's exact top 4, {queries} query vectors like the chunks': recall {recall:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000, help="rows in the build comparison")
    parser.add_argument("--refresh-rows", type=int, default=10_000, help="rows built then refreshed (1 %% changed)")
    parser.add_argument("--retrieval-chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=50, help="timed nbcustom queries")
    parser.add_argument("--baseline-queries", type=int, default=10, help="timed llama-index queries")
    parser.add_argument("--repeat", type=int, default=1, help="build comparisons (the median ratio counts)")
    parser.add_argument("--only", default="build,refresh,retrieval,backends")
    parser.add_argument("--backend-chunks", type=int, default=100_000, help="chunks in the DuckDB / pgvector comparison")
    parser.add_argument("--vector-store", help="postgresql://USER@HOST:PORT/DB for the comparison (default: start pgserver)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for both sides (default 0: torch's own default, one per core)")
    args = parser.parse_args()
    parts = {p.strip() for p in args.only.split(",") if p.strip()}

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"embedding model: {embed_folder()}; chunk size {CHUNK_SIZE}, overlap {CHUNK_OVERLAP}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        if "build" in parts:
            results["build"] = bench_build(args.rows, args.repeat, scratch)
        if "refresh" in parts:
            results["refresh"] = bench_refresh(args.refresh_rows, scratch)
        if "retrieval" in parts:
            results["retrieval"] = bench_retrieval(args.retrieval_chunks, args.queries, args.baseline_queries, scratch)
        if "backends" in parts:
            bench_backends(args.backend_chunks, args.queries, scratch, args.vector_store)  # figures, no target
    print("summary: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in results.items())
          + f"; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
