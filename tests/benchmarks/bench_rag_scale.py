"""``%%rag`` at a million chunks (issue 30): vector search with the approximate index (faiss
IVF, ``rag/stores/ann.py``) against the exact search nbcustom used before (one pass of numpy
over the whole matrix), in one run. Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_rag_scale.py [--chunks 1000000] [--real-rows 2000] [--queries 50]
        [--memory-rows 10000,100000] [--rows 100000] [--no-baseline] [--only search,memory,rows]

1. ``--real-rows`` rows (bench_rag.py's short records) are indexed through ``nbcustom.rag``
   with the real MiniLM model.
2. A version with ``--chunks`` chunks is written through the store interface, as a build
   writes one (``stores.create`` -> ``insert`` -> ``finish``, which trains and fills the IVF
   index): the real chunks and their vectors, then synthetic chunks. A synthetic vector is a
   real chunk's vector plus Gaussian noise (cosine about 0.8 to it), renormalized: clustered
   around real embeddings, not uniform. This is said in the output.
3. Questions: real rows' texts with a third of their words dropped, embedded by the model.
   Timed: ``Vectors.search`` (k=10) with the IVF index and the exact numpy pass over the same
   matrix; recall@10 of the IVF result against the exact one; ``RagIndex.retrieve`` (what
   ``nbcustom.retrieve`` runs once the index is loaded) with ``search="vector"``, query
   embedding included, p50 and p95.

4. Peak memory of a build: ``nbcustom.rag`` over ``--memory-rows`` rows (the real model) read by
   a query from a DuckDB table of the process, each in a fresh process that builds in itself
   (``NBCUSTOM_WORKER=off``), its peak resident set (``ru_maxrss``) against the same process
   after loading the model and building 100 rows.

5. ``--rows`` real rows (``rows``): the build against llama-index's ``from_documents``,
   ``RagIndex.retrieve`` with the default search, a row's own text as the question, and a
   refresh after 1 % of the rows changed (see ``rows``).

Goals: p50 under 20 ms at 1,000,000 chunks on 2 cores, recall@10 at least 0.95; the build's
peak memory growing by no more than the vectors' own size (rows x 384 x 4 bytes).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rag import frame  # noqa: E402


def percentile(values, share: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(share * len(values))) - 1)] * 1000


MEMORY = """
import resource, sys, time, tempfile
sys.path.insert(0, {bench!r})
import duckdb
import nbcustom
from bench_rag import frame
con = duckdb.connect()
rows = frame({rows})
con.register("source", rows)
con.execute("CREATE TABLE records AS SELECT * FROM source")
con.unregister("source")
with tempfile.TemporaryDirectory() as scratch:
    nbcustom.rag("warm", "SELECT * FROM records LIMIT 100", con=con, store=scratch, ui="none", metadata="topic")
    warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    nbcustom.rag("big", "SELECT * FROM records", con=con, store=scratch, ui="none", metadata="topic")
    print(warm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter() - started)
"""


def peak_memory(sizes: list[int]) -> None:
    import subprocess

    for rows in sizes:
        done = subprocess.run([sys.executable, "-c", MEMORY.format(bench=str(Path(__file__).resolve().parent), rows=rows)],
                              capture_output=True, text=True, env={**os.environ, "NBCUSTOM_WORKER": "off"})
        if done.returncode:
            sys.exit(f"build of {rows:,} rows failed:\n{done.stderr[-3000:]}")
        out = done.stdout.split()
        warm, peak, seconds = int(out[-3]) / 1024, int(out[-2]) / 1024, float(out[-1])
        print(f"build of {rows:>7,} rows: {seconds:6.1f} s ({rows / seconds:5.0f} rows/s), peak {peak:6.0f} MB, "
              f"{peak - warm:5.0f} MB over the warmed-up process (the vectors alone: {rows * 384 * 4 / 2**20:4.0f} MB)")


def rows(args) -> None:
    """Issue 30's real-row acceptance at ``--rows`` rows, every vector from the real model:
    build throughput against llama-index's ``from_documents`` (bench_rag.py's baseline, both
    warmed up), ``RagIndex.retrieve`` p50 with the index's default search, how often a
    question that repeats a row's text finds that row first, and a refresh after 1 % of the
    rows changed against the full build."""
    import nbcustom
    from bench_rag import nbc_warm_up, plain_build, plain_embedder

    n = args.rows
    table = frame(n)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        embed_model = plain_embedder()
        nbc_warm_up(scratch)
        started = time.perf_counter()
        version = nbcustom.rag("rows", table, store=scratch / "store", ui="none", metadata="topic")
        ours = time.perf_counter() - started
        print(f"nbcustom.rag: {n:,} rows in {ours:.1f} s = {n / ours:.0f} rows/s ({version.manifest['index'].get('embed_precision')}); "
              f"ANN: {version.manifest['index']['store'].get('ann')}")
        if args.baseline:
            plain = plain_build(table, embed_model)
            print(f"llama-index from_documents: {n:,} rows in {plain:.1f} s = {n / plain:.0f} rows/s; nbcustom {plain / ours:.2f}x (goal >= 2x)")
        index = nbcustom.load("rows", store=scratch / "store")
        texts, ids = table["text"].tolist(), table["id"].tolist()
        index.retrieve([texts[0]])  # the keyword index and the query model, built and loaded once
        times, first = [], 0
        for i in random.Random(2).sample(range(n), args.queries):
            started = time.perf_counter()
            found = index.retrieve([texts[i]])[0]
            times.append(time.perf_counter() - started)
            first += found[0]["id"] == ids[i]
        p50 = statistics.median(times) * 1000
        print(f"RagIndex.retrieve (default search {index.search}, top {index.top_k}) p50 {p50:.1f} ms p95 {percentile(times, 0.95):.1f} ms "
              f"(goal < 15 ms): {'PASS' if p50 < 15 else 'FAIL'}")
        print(f"a row's own text finds it first: {first}/{args.queries} = {first / args.queries:.3f} (goal >= 0.95)")
        changed = table.copy()
        picked = random.Random(3).sample(range(n), n // 100)
        changed.loc[picked, "text"] = [t + " It was checked again later." for t in changed.loc[picked, "text"]]
        started = time.perf_counter()
        refreshed = nbcustom.rag("rows", changed, store=scratch / "store", ui="none", metadata="topic")
        again = time.perf_counter() - started
        counts = refreshed.manifest["counts"]
        print(f"refresh of {counts['changed']:,} changed rows ({counts['embedded']:,} embedded): {again:.1f} s = {100 * again / ours:.1f} % of the build "
              f"(goal < 5 %); ANN {refreshed.manifest['index']['store'].get('ann')}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--chunks", type=int, default=1_000_000)
    parser.add_argument("--real-rows", type=int, default=2_000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--memory-rows", default="10000,100000")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--only", default="search,memory,rows")
    args = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.machine())
    print(f"{cpu}, {os.cpu_count()} CPUs")
    if "memory" in args.only:
        peak_memory([int(n) for n in args.memory_rows.split(",")])
    if "search" in args.only:
        search(args)
    if "rows" in args.only:
        rows(args)


def search(args) -> None:
    import numpy as np

    import nbcustom
    from nbcustom.engines.rag import stores
    from nbcustom.store import Store

    print(f"{args.chunks:,} chunks ({args.real_rows:,} embedded by the real model, the rest synthetic around them)")
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        rows = frame(args.real_rows)
        started = time.perf_counter()
        nbcustom.rag("real", rows, store=store, ui="none", metadata="topic")
        print(f"real index: {args.real_rows:,} rows in {time.perf_counter() - started:.1f} s")
        real = stores.open(Store(store).get("real"))
        base = np.asarray(real.matrix)
        rng = np.random.default_rng(0)
        dim = base.shape[1]

        def chunks_and_vectors():
            chunks = [{"chunk_id": c, "row_id": r, "position": 0, "hash": "h", "text": t, "metadata": real.metadata(i)}
                      for i, (c, r, t) in enumerate(zip(real.chunk_ids, real.row_ids, real.texts))]
            yield chunks, base
            for start in range(len(base), args.chunks, 100_000):
                count = min(100_000, args.chunks - start)
                source = base[rng.integers(0, len(base), count)]
                noisy = source + rng.standard_normal((count, dim)).astype(np.float32) * (0.75 / np.sqrt(dim))
                noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
                yield [{"chunk_id": f"s{start + i}#0", "row_id": f"s{start + i}", "position": 0, "hash": "h",
                        "text": f"synthetic chunk {start + i}", "metadata": {"topic": "synthetic"}} for i in range(count)], noisy

        started = time.perf_counter()
        with Store(store).build("big", "rag") as build:
            writer = stores.create("duckdb", None, "big", build.model_dir, dim)
            build.on_abort.append(writer.discard)
            for chunks, vectors in chunks_and_vectors():
                writer.insert(chunks, vectors)
            entry, total = writer.finish()
            build.manifest.update({"options": {"top_k": 4, "search": "vector"},
                                   "index": {"id_type": "str", "dim": dim, "store": entry}, "counts": {"chunks": total}})
        written = time.perf_counter() - started
        print(f"written {total:,} chunks with the IVF index ({entry['ann']['lists']} cells, {entry['ann']['probes']} probed) in {written:.1f} s")

        index = nbcustom.load("big", store=store)
        vectors = index.vectors
        words = [t.split() for t in rows["text"]]
        questions = [" ".join(w for j, w in enumerate(ws) if j % 3 != 1) for ws in random.Random(1).sample(words, args.queries)]
        embed_model = index.embed_model()
        queries = [np.asarray(embed_model.get_query_embedding(q), dtype=np.float32) for q in questions]
        vectors.search(queries[0], 10)
        ann_times, exact_times, hits = [], [], 0
        ann_index, vectors._ann = vectors._ann, None
        truths = []
        for q in queries:  # the exact search of before: the same object without its IVF index
            started = time.perf_counter()
            truths.append({p for p, _ in vectors.search(q, 10)})
            exact_times.append(time.perf_counter() - started)
        vectors._ann = ann_index
        for q, truth in zip(queries, truths):
            started = time.perf_counter()
            found = vectors.search(q, 10)
            ann_times.append(time.perf_counter() - started)
            hits += len(truth & {p for p, _ in found})
        recall = hits / (10 * len(queries))
        end_to_end = []
        for question in questions:  # what nbcustom.retrieve runs once the index is loaded
            started = time.perf_counter()
            index.retrieve([question], 10, "vector")
            end_to_end.append(time.perf_counter() - started)
        print(f"vector search, IVF    p50 {statistics.median(ann_times) * 1000:7.2f} ms  p95 {percentile(ann_times, 0.95):7.2f} ms")
        print(f"vector search, exact  p50 {statistics.median(exact_times) * 1000:7.2f} ms  p95 {percentile(exact_times, 0.95):7.2f} ms"
              f"  ({statistics.median(exact_times) / statistics.median(ann_times):.1f}x the IVF time)")
        print(f"RagIndex.retrieve (search=vector, query embedding included) p50 {statistics.median(end_to_end) * 1000:.1f} ms"
              f"  p95 {percentile(end_to_end, 0.95):.1f} ms")
        print(f"recall@10 of the IVF search against the exact search: {recall:.3f} (goal >= 0.95): {'PASS' if recall >= 0.95 else 'FAIL'}")
        p50 = statistics.median(ann_times) * 1000
        print(f"IVF search p50 {p50:.2f} ms (goal < 20 ms): {'PASS' if p50 < 20 else 'FAIL'}")


if __name__ == "__main__":
    main()
