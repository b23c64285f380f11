"""The vectors of a RAG index: one DuckDB table, ``chunks``, in ``model/index.duckdb``.

Columns: chunk_id, row_id, position (chunk number within the row), hash (the row's content
hash), text, metadata (JSON), embedding FLOAT[dim], key (a number that stays with the chunk
from version to version). A refresh copies the unchanged rows' chunks from the previous
version's file instead of embedding them again. Search loads the matrix once and ranks by
cosine similarity with numpy (one pass over the matrix); from ``ann.MIN_CHUNKS`` chunks on, an
approximate index (``ann``, faiss IVF-SQ8) in the version folder finds candidates, which the
matrix scores.
``DuckDBVectorStore`` exposes the chunks to llama-index retrievers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

FILE = "index.duckdb"
COLUMNS = ("chunk_id", "row_id", "position", "hash", "text", "metadata")
# The writer's cache of table blocks: by default DuckDB keeps every block it wrote in memory (up
# to 80 % of RAM), so a build's memory grew with its rows (+1,080 MB at 300,000 chunks; with
# this limit +73 MB, 12 % slower to insert: tests/benchmarks/RESULTS.md). Blocks beyond it
# are on disk already; a large query spills to a temporary file.
WRITE_MEMORY = "128MB"
# ... and while the ANN index is made from the closed file: the vectors only stream through it
READ_MEMORY = "32MB"


class Writer:
    """A new version's ``model/index.duckdb`` (the store interface's writer)."""

    def __init__(self, location: str, name: str, model_dir: Path, dim: int, previous: dict | None = None):
        self._previous, self._folder = previous, Path(model_dir)
        self.can_copy = previous is not None and previous["backend"] == "duckdb"
        self._con = create(self._folder / FILE, dim)
        self._next_key = self._first_new_key = _next_key(_path(previous)) if self.can_copy else 0
        self._copied = False

    def insert(self, chunks: Sequence[dict], vectors) -> None:
        insert(self._con, chunks, vectors, self._next_key)
        self._next_key += len(chunks)

    def copy(self, row_ids: Sequence[str]) -> int:
        """Copy the previous version's chunks of ``row_ids``, file to file."""
        copied = copy_rows(self._con, _path(self._previous), row_ids, self._next_key)
        self._copied, self._next_key = True, self._next_key + copied
        return copied

    def finish(self) -> tuple[dict, int]:
        import duckdb

        from . import ann

        total = self._con.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        close(self._con)  # the file is complete; the writer's cache of blocks goes with it
        # the ANN index is made from the file read again, with a smaller cache
        con = self._con = duckdb.connect(str(self._folder / FILE), read_only=True, config={"memory_limit": READ_MEMORY})
        try:
            index = ann.write(con, self._folder, int(total), self._previous if self._copied else None, self._first_new_key)
        finally:
            con.close()
        return {"backend": "duckdb", "file": f"model/{FILE}", **({"ann": index} if index else {})}, int(total)

    def discard(self) -> None:
        """Close the file; it is inside the staging folder, which the store removes."""
        self._con.close()


def create(path: Path, dim: int):
    """A new, empty index file; returns the open connection."""
    import duckdb

    con = duckdb.connect(str(path), config={"memory_limit": WRITE_MEMORY})
    con.execute(
        f"""CREATE TABLE chunks (chunk_id VARCHAR PRIMARY KEY, row_id VARCHAR NOT NULL, position INTEGER,
            hash VARCHAR NOT NULL, text VARCHAR, metadata JSON, embedding FLOAT[{int(dim)}], key BIGINT)"""
    )
    return con


def insert(con, chunks: Sequence[dict], vectors, first_key: int = 0) -> None:
    """Add ``chunks`` (dicts with COLUMNS, metadata a dict) with their embedding rows, keyed
    from ``first_key`` on."""
    import numpy as np
    import pyarrow as pa

    if not len(chunks):
        return
    vectors = np.asarray(vectors, dtype=np.float32)
    columns = {c: [ch[c] for ch in chunks] for c in COLUMNS}
    columns["metadata"] = [json.dumps(m, default=str) for m in columns["metadata"]]
    table = pa.table(
        {
            **{c: pa.array(v) for c, v in columns.items()},
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
            "key": pa.array(np.arange(first_key, first_key + len(chunks), dtype=np.int64)),
        }
    )
    con.register("__new_chunks", table)
    try:
        con.execute("INSERT INTO chunks SELECT * FROM __new_chunks").fetchall()
    finally:
        con.unregister("__new_chunks")


def copy_rows(con, previous: Path, row_ids: Sequence[str], next_key: int = 0) -> int:
    """Copy the chunks of ``row_ids`` (vectors and keys included) from a previous index file
    (one made before keys existed gets keys from ``next_key`` on)."""
    import pyarrow as pa

    if not len(row_ids):
        return 0
    con.execute(f"ATTACH '{_quoted(previous)}' AS previous (READ_ONLY)")
    con.register("__keep", pa.table({"row_id": pa.array(list(row_ids), pa.string())}))
    try:
        key = "c.key" if _keyed(con, "previous") else f"{int(next_key) - 1} + row_number() OVER ()"
        before = con.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        con.execute(
            f"INSERT INTO chunks SELECT c.chunk_id, c.row_id, c.position, c.hash, c.text, c.metadata, c.embedding, {key} "
            "FROM previous.chunks c SEMI JOIN __keep k ON c.row_id = k.row_id"
        ).fetchall()
        return con.execute("SELECT count(*) FROM chunks").fetchall()[0][0] - before
    finally:
        con.unregister("__keep")
        con.execute("DETACH previous")


def _next_key(path: Path) -> int:
    """One more than the largest chunk key of an index file (0 for a file without keys)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return int(con.execute("SELECT coalesce(max(key) + 1, 0) FROM chunks").fetchall()[0][0]) if _keyed(con) else 0
    finally:
        con.close()


def _keyed(con, database: str | None = None) -> bool:
    """Whether the chunks table (of the attached ``database``) has keys (files made before
    keys existed have not)."""
    where = f"database_name = '{database}' AND " if database else ""
    found = con.execute(f"SELECT count(*) FROM duckdb_columns() WHERE {where}table_name = 'chunks' AND column_name = 'key'")
    return bool(found.fetchall()[0][0])


def close(con) -> None:
    """Checkpoint and close, so the file is complete (no WAL) before its checksum is taken."""
    con.execute("CHECKPOINT")
    con.close()


def open(entry: dict) -> "Vectors":
    return Vectors(entry)


def drop(entry: dict) -> None:
    """Nothing outside the version folder to remove."""


def row_hashes(entry: dict) -> dict[str, str]:
    """row id -> content hash of every row in a version's index file."""
    import duckdb

    con = duckdb.connect(str(_path(entry)), read_only=True)
    try:
        return dict(con.execute("SELECT DISTINCT row_id, hash FROM chunks").fetchall())
    finally:
        con.close()


class Vectors:
    """An index file's chunks in memory: texts, metadata, the normalized matrix, and the
    approximate index where the version has one."""

    def __init__(self, entry: dict):
        import duckdb
        import numpy as np

        from . import ann

        con = duckdb.connect(str(_path(entry)), read_only=True)
        try:
            table = con.sql("SELECT * FROM chunks ORDER BY row_id, position").to_arrow_table()
        finally:
            con.close()
        self.chunk_ids: list[str] = table.column("chunk_id").to_pylist()
        self.row_ids: list[str] = table.column("row_id").to_pylist()
        self.texts: list[str] = table.column("text").to_pylist()
        self._metadata: list[str] = table.column("metadata").to_pylist()
        embedding = table.column("embedding").combine_chunks()
        dim = embedding.type.list_size
        self.matrix = ann.unit(embedding.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim))
        self._ann = None
        if entry.get("ann"):
            self._ann, self._keys = ann.load(entry["folder"], entry["ann"]), table.column("key").to_numpy()
            self._position = np.full(int(self._keys.max()) + 1, -1, dtype=np.int64)
            self._position[self._keys] = np.arange(len(self._keys))

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def metadata(self, i: int) -> dict:
        return json.loads(self._metadata[i]) if self._metadata[i] else {}

    def search(self, query, k: int, among=None) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity) of the ``k`` nearest chunks, best first; only
        among the chunk positions ``among`` when given."""
        import numpy as np

        from . import ann

        positions = None if among is None else np.asarray(among, dtype=np.int64)
        if self._ann is not None and (positions is None or len(positions) > ann.MIN_CHUNKS):  # else exact: as fast
            # the index's candidates, scored below against the full vectors
            positions = self._position[ann.candidates(self._ann, query, k, None if positions is None else self._keys[positions])]
        q = np.asarray(query, dtype=np.float32)
        q = q / (np.linalg.norm(q) or 1.0)
        matrix = self.matrix if positions is None else self.matrix[positions]
        # einsum's own SIMD loop, not a BLAS matrix-vector product: the product is bound by
        # memory (one pass over the matrix), so one thread is as fast as BLAS's threads, and
        # it leaves no BLAS worker threads spinning that would take the cores from the
        # embedding model's threads on the next query (that doubled its time on 2 cores).
        scores = np.einsum("ij,j->i", matrix, q)
        k = min(k, len(scores))
        if k <= 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(i if positions is None else positions[i]), float(scores[i])) for i in top]

    def vector_store(self):
        """These chunks as a read-only llama-index vector store."""
        return vector_store(self)


def vector_store(vectors: Vectors):
    """``vectors`` as a read-only llama-index vector store (nodes carry text and metadata)."""
    return _store_class()(vectors)


_CLASS: dict[str, type] = {}


def _store_class() -> type:
    if "store" not in _CLASS:
        from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
        from llama_index.core.vector_stores.types import BasePydanticVectorStore, VectorStoreQuery, VectorStoreQueryResult
        from pydantic import PrivateAttr

        class DuckDBVectorStore(BasePydanticVectorStore):
            """The chunks of a committed index version; versions are immutable, so read-only."""

            stores_text: bool = True
            _vectors: Any = PrivateAttr()

            def __init__(self, vectors: Vectors, **kwargs):
                super().__init__(**kwargs)
                self._vectors = vectors

            @property
            def client(self) -> Any:
                return self._vectors

            def add(self, nodes, **kwargs) -> list[str]:
                raise NotImplementedError("index versions are read-only: refresh the index with %%rag NAME + SQL")

            def delete(self, ref_doc_id: str, **kwargs) -> None:
                raise NotImplementedError("index versions are read-only: refresh the index with %%rag NAME + SQL")

            def query(self, query: VectorStoreQuery, **kwargs) -> VectorStoreQueryResult:
                v = self._vectors
                hits = v.search(query.query_embedding, query.similarity_top_k)
                nodes = []
                for i, _ in hits:
                    node = TextNode(id_=v.chunk_ids[i], text=v.texts[i], metadata=v.metadata(i))
                    node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=v.row_ids[i])
                    nodes.append(node)
                return VectorStoreQueryResult(nodes=nodes, similarities=[s for _, s in hits], ids=[v.chunk_ids[i] for i, _ in hits])

        _CLASS["store"] = DuckDBVectorStore
    return _CLASS["store"]


def _path(entry: dict) -> Path:
    return Path(entry["folder"]) / entry["file"]


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")
