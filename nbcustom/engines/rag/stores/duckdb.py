"""The vectors of a RAG index: one DuckDB table, ``chunks``, in ``model/index.duckdb``.

Columns: chunk_id, row_id, position (chunk number within the row), hash (the row's content
hash), text, metadata (JSON), embedding FLOAT[dim]. A refresh copies the unchanged rows'
chunks from the previous version's file instead of embedding them again. Search loads the
matrix once and ranks by cosine similarity with numpy (one pass over the matrix, fast at 100k
chunks); ``VectorStore`` exposes it to llama-index retrievers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

FILE = "index.duckdb"
COLUMNS = ("chunk_id", "row_id", "position", "hash", "text", "metadata")


def create(path: Path, dim: int):
    """A new, empty index file; returns the open connection."""
    import duckdb

    con = duckdb.connect(str(path))
    con.execute(
        f"""CREATE TABLE chunks (chunk_id VARCHAR PRIMARY KEY, row_id VARCHAR NOT NULL, position INTEGER,
            hash VARCHAR NOT NULL, text VARCHAR, metadata JSON, embedding FLOAT[{int(dim)}])"""
    )
    return con


def insert(con, chunks: Sequence[dict], vectors) -> None:
    """Add ``chunks`` (dicts with COLUMNS, metadata a dict) with their embedding rows."""
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
        }
    )
    con.register("__new_chunks", table)
    try:
        con.execute("INSERT INTO chunks SELECT * FROM __new_chunks").fetchall()
    finally:
        con.unregister("__new_chunks")


def copy_rows(con, previous: Path, row_ids: Sequence[str]) -> int:
    """Copy the chunks of ``row_ids`` (vectors included) from a previous index file."""
    import pyarrow as pa

    if not len(row_ids):
        return 0
    con.execute(f"ATTACH '{_quoted(previous)}' AS previous (READ_ONLY)")
    con.register("__keep", pa.table({"row_id": pa.array(list(row_ids), pa.string())}))
    try:
        before = con.execute("SELECT count(*) FROM chunks").fetchall()[0][0]
        con.execute("INSERT INTO chunks SELECT c.* FROM previous.chunks c SEMI JOIN __keep k ON c.row_id = k.row_id").fetchall()
        return con.execute("SELECT count(*) FROM chunks").fetchall()[0][0] - before
    finally:
        con.unregister("__keep")
        con.execute("DETACH previous")


def close(con) -> None:
    """Checkpoint and close, so the file is complete (no WAL) before its checksum is taken."""
    con.execute("CHECKPOINT")
    con.close()


def row_hashes(path: Path) -> dict[str, str]:
    """row id -> content hash of every row in an index file."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return dict(con.execute("SELECT DISTINCT row_id, hash FROM chunks").fetchall())
    finally:
        con.close()


class Vectors:
    """An index file's chunks in memory: texts, metadata and the normalized matrix."""

    def __init__(self, path: Path):
        import duckdb
        import numpy as np

        con = duckdb.connect(str(path), read_only=True)
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
        matrix = embedding.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        norms = np.linalg.norm(matrix, axis=1, keepdims=True)
        self.matrix = matrix / np.where(norms == 0, 1, norms)

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def metadata(self, i: int) -> dict:
        return json.loads(self._metadata[i]) if self._metadata[i] else {}

    def search(self, query, k: int, among=None) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity) of the ``k`` nearest chunks, best first;
        only chunks at the positions ``among`` when given."""
        import numpy as np

        q = np.asarray(query, dtype=np.float32)
        q = q / (np.linalg.norm(q) or 1.0)
        positions = None if among is None else np.asarray(among, dtype=np.int64)
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


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")
