"""The vectors of a RAG index in PostgreSQL with pgvector: one table per version.

The table has llama-index ``PGVectorStore``'s own layout (``data_<name>``: id, text,
metadata_ with the node as llama-index serializes it, node_id = chunk id, embedding
vector(dim)), plus row_id, position, hash and metadata (the row's), and an HNSW index on
cosine distance. So ``vector_store()`` is a ``PGVectorStore`` over a version's table, and any
llama-index code can open a version with ``PGVectorStore(table_name=..., perform_setup=False)``.

Writing goes through psycopg + pgvector directly, because ``PGVectorStore`` cannot express
versions and refreshes: it adds nodes one ORM row at a time to one table, and has no way to
copy the unchanged rows' vectors from the previous version's table on the server (``INSERT
... SELECT``) nor to drop a version's table. Passwords come from ``nbcustom.credentials``
(or libpq's ``PGPASSWORD`` / ``~/.pgpass``) at run time and are never written anywhere.
"""

from __future__ import annotations

import re
import uuid
from typing import Sequence

from ....credentials import mask, password, server, strip, where
from ....errors import NbCustomError

# HNSW candidates kept per query (pgvector's default is 40): recall for a little time.
EF_SEARCH = 100
# A version's columns as written: PGVectorStore's (but id) first, then nbcustom's.
COLUMNS = ("node_id", "text", "metadata_", "embedding", "row_id", "position", "hash", "metadata")
TYPES = ("varchar", "varchar", "jsonb", "vector", "varchar", "int4", "varchar", "jsonb")
ADDRESS = ("host", "port", "database", "user")


def connect(url: str):
    """An autocommit connection to a version's URL (without its password) with pgvector's
    types; a one-line error naming the server when it cannot be reached or has no ``vector``
    extension."""
    import psycopg
    from pgvector.psycopg import register_vector

    address = server(url)
    try:
        con = psycopg.connect(url, password=password(address), connect_timeout=10, autocommit=True)
    except psycopg.OperationalError as e:
        raise NbCustomError(
            f"cannot connect to PostgreSQL at {where(address)} ({_reason(e)}): start the server or fix the vector store's "
            "user, database or password (PGPASSWORD, ~/.pgpass, or the URL)"
        ) from None
    try:
        if not con.execute("SELECT 1 FROM pg_extension WHERE extname = 'vector'").fetchone():
            try:
                con.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except psycopg.Error:
                raise NbCustomError(
                    f"PostgreSQL at {where(address)} has no `vector` extension in database {address['database']!r}: "
                    "have a superuser run CREATE EXTENSION vector there (pgvector must be installed on the server)"
                ) from None
        register_vector(con)
    except BaseException:
        con.close()
        raise
    return con


def check(location: str) -> None:
    """Connect to the server of ``location`` once (see ``connect``) and close."""
    connect(strip(location)).close()


class Writer:
    """A new version's table: rows are added, unchanged rows copied from the previous
    version's table on the server, then the HNSW index is built once."""

    def __init__(self, location: str, name: str, model_dir, dim: int, previous: dict | None = None):
        import psycopg
        from psycopg import sql

        self.url = strip(location)
        self.address = server(self.url)
        self._dim = int(dim)
        self._previous = previous
        self.can_copy = previous is not None and previous["backend"] == "pgvector" and all(
            previous[k] == self.address[k] for k in ADDRESS
        )
        self._con = connect(self.url)
        self.schema = self._con.execute("SELECT current_schema()").fetchone()[0]
        slug = re.sub(r"[^a-z0-9_]", "_", name.lower())[:20]
        self.table = f"data_nbcustom_{slug}_{uuid.uuid4().hex[:10]}"  # data_: PGVectorStore's prefix
        self._name = sql.Identifier(self.schema, self.table)
        try:
            self._con.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigserial PRIMARY KEY, text varchar NOT NULL, metadata_ jsonb, "
                    "node_id varchar NOT NULL UNIQUE, embedding vector({}), row_id varchar NOT NULL, position integer, "
                    "hash varchar NOT NULL, metadata jsonb)"
                ).format(self._name, sql.Literal(self._dim))
            )
        except psycopg.Error as e:
            self._con.close()
            raise NbCustomError(
                f"PostgreSQL at {where(self.address)} did not create a table in schema "
                f"{self.schema!r} ({_reason(e)}): grant user {self.address['user']!r} CREATE on it"
            ) from None

    def insert(self, chunks: Sequence[dict], vectors) -> None:
        """Add ``chunks`` with their vectors (binary COPY)."""
        import numpy as np
        from llama_index.core.vector_stores.utils import node_to_metadata_dict
        from psycopg import sql

        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        with self._con.cursor() as cur, cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self._name, columns)) as copy:
            copy.set_types(TYPES)
            for chunk, vector in zip(chunks, np.asarray(vectors, dtype=np.float32)):
                node = node_to_metadata_dict(_node(chunk), remove_text=True, flat_metadata=False)
                copy.write_row(
                    (chunk["chunk_id"], chunk["text"], node, vector, chunk["row_id"], chunk["position"], chunk["hash"], chunk["metadata"])
                )

    def copy(self, row_ids: Sequence[str]) -> int:
        """Copy the previous version's chunks of ``row_ids``, vectors included, on the server."""
        import psycopg
        from psycopg import sql

        columns = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        source = sql.Identifier(self._previous["schema"], self._previous["table"])
        try:
            cur = self._con.execute(
                sql.SQL("INSERT INTO {} ({}) SELECT {} FROM {} WHERE row_id = ANY(%s)").format(self._name, columns, columns, source),
                [list(row_ids)],
            )
        except psycopg.errors.UndefinedTable:
            raise _gone(self._previous) from None
        return cur.rowcount

    def finish(self) -> tuple[dict, int]:
        """Build the HNSW index (cosine distance) and close; the manifest's store entry."""
        from psycopg import sql

        # One build after the rows are in, with room to keep the graph in memory (the
        # session's default of 64 MB is exceeded at ~50,000 chunks and slows it down a lot).
        self._con.execute("SET maintenance_work_mem = '512MB'")
        self._con.execute(
            sql.SQL("CREATE INDEX {} ON {} USING hnsw (embedding vector_cosine_ops)").format(
                sql.Identifier(f"{self.table}_embedding_idx"), self._name
            )
        )
        self._con.execute(sql.SQL("ANALYZE {}").format(self._name))
        total = self._con.execute(sql.SQL("SELECT count(*) FROM {}").format(self._name)).fetchone()[0]
        self._con.close()
        entry = {"backend": "pgvector", "url": self.url, **self.address, "schema": self.schema, "table": self.table, "dim": self._dim}
        return entry, int(total)

    def discard(self) -> None:
        """Drop the table of a build that failed."""
        self._con.close()
        drop({"url": self.url, "schema": self.schema, "table": self.table})


def open(entry: dict) -> "Vectors":
    return Vectors(entry)


def row_hashes(entry: dict) -> dict[str, str]:
    """row id -> content hash of every row in a version's table."""
    from psycopg import sql

    return dict(_read(entry, sql.SQL("SELECT DISTINCT row_id, hash FROM {}").format(_table(entry))))


def drop(entry: dict) -> None:
    """Drop a version's table (``%nbc rm``); a table already gone is fine."""
    from psycopg import sql

    with connect(entry["url"]) as con:
        con.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(_table(entry)))


class Vectors:
    """A version's chunks: ids, texts and metadata read when it is opened; the vectors stay
    on the server and are searched there."""

    def __init__(self, entry: dict):
        from psycopg import sql

        self._entry = entry
        self._con, self._ef_search = None, None
        rows = self._run(sql.SQL("SELECT node_id, row_id, text, metadata FROM {} ORDER BY row_id COLLATE \"C\", position").format(_table(entry)))
        self.chunk_ids: list[str] = [r[0] for r in rows]
        self.row_ids: list[str] = [r[1] for r in rows]
        self.texts: list[str] = [r[2] for r in rows]
        self._metadata: list[dict | None] = [r[3] for r in rows]
        self._positions = {chunk_id: i for i, chunk_id in enumerate(self.chunk_ids)}

    def __len__(self) -> int:
        return len(self.chunk_ids)

    def metadata(self, i: int) -> dict:
        return dict(self._metadata[i] or {})

    def search(self, query, k: int, among=None) -> list[tuple[int, float]]:
        """(chunk position, cosine similarity) of the ``k`` nearest chunks, best first.

        Without ``among``: the HNSW index (approximate). With ``among``: exact, over those
        chunks only (ordering by the score, not the distance operator, keeps the index out:
        an HNSW scan filters after its approximate search and can return fewer than k)."""
        import numpy as np
        from psycopg import sql

        if k <= 0 or not self.chunk_ids:
            return []
        params = {"q": np.asarray(query, dtype=np.float32), "k": int(k)}
        if among is None:
            query_sql = "SELECT node_id, 1 - (embedding <=> %(q)s) FROM {} ORDER BY embedding <=> %(q)s LIMIT %(k)s"
        else:
            params["ids"] = [self.chunk_ids[int(i)] for i in among]
            query_sql = (
                "SELECT node_id, 1 - (embedding <=> %(q)s) AS score FROM {} WHERE node_id = ANY(%(ids)s) "
                "ORDER BY score DESC, node_id LIMIT %(k)s"
            )
        rows = self._run(sql.SQL(query_sql).format(_table(self._entry)), params, ef_search=min(max(EF_SEARCH, int(k)), 1000))
        return [(self._positions[chunk_id], float(score)) for chunk_id, score in rows]

    def vector_store(self):
        """llama-index's own ``PGVectorStore`` over this version's table (read it, don't add)."""
        from llama_index.vector_stores.postgres import PGVectorStore
        from sqlalchemy import create_engine, make_url
        from sqlalchemy.ext.asyncio import create_async_engine

        address = server(self._entry["url"])

        def url(driver: str):  # the password lives in the engine, never in a string
            return make_url(self._entry["url"]).set(drivername=driver, password=password(address))

        return PGVectorStore(
            table_name=self._entry["table"].removeprefix("data_"), schema_name=self._entry["schema"],
            embed_dim=int(self._entry["dim"]), use_jsonb=True, perform_setup=False, hnsw_kwargs={"hnsw_ef_search": EF_SEARCH},
            # psycopg2, not psycopg 3: PGVectorStore sends "SET hnsw.ef_search = :n" with a bound
            # parameter, which only client-side binding can run.
            engine=create_engine(url("postgresql+psycopg2"), pool_pre_ping=True), async_engine=create_async_engine(url("postgresql+asyncpg")),
        )

    def _run(self, query, params=None, ef_search: int | None = None) -> list[tuple]:
        """Run a query on this version's connection, connecting again once if it was lost
        (a notebook outlives server restarts)."""
        import psycopg

        for attempt in (1, 2):
            if self._con is None or self._con.closed or self._con.broken:
                self._con, self._ef_search = connect(self._entry["url"]), None
            try:
                if ef_search is not None and ef_search != self._ef_search:
                    self._con.execute(f"SET hnsw.ef_search = {int(ef_search)}")
                    self._ef_search = ef_search
                return self._con.execute(query, params).fetchall()
            except psycopg.errors.UndefinedTable:
                raise _gone(self._entry) from None
            except psycopg.OperationalError:
                if attempt == 2 or not self._con.broken:
                    raise


def _read(entry: dict, query) -> list[tuple]:
    import psycopg

    with connect(entry["url"]) as con:
        try:
            return con.execute(query).fetchall()
        except psycopg.errors.UndefinedTable:
            raise _gone(entry) from None


def _node(chunk: dict):
    """A chunk as the llama-index node that ``PGVectorStore`` reads back."""
    from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode

    node = TextNode(id_=chunk["chunk_id"], text=chunk["text"], metadata=chunk["metadata"])
    node.relationships[NodeRelationship.SOURCE] = RelatedNodeInfo(node_id=chunk["row_id"])
    return node


def _table(entry: dict):
    from psycopg import sql

    return sql.Identifier(entry["schema"], entry["table"])


def _gone(entry: dict) -> NbCustomError:
    label = entry.get("label", "this version")
    return NbCustomError(
        f"{label}: its vectors table {entry['schema']}.{entry['table']} is gone from PostgreSQL at "
        f"{where(entry)}, database {entry['database']}: remove the version with %nbc rm {label} and run %%rag again"
    )


def _reason(error: Exception) -> str:
    """The server's or libpq's reason, one line, without the connection details or a password."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    reason = first.rsplit("failed: ", 1)[-1]
    return mask(" ".join(reason.replace("FATAL:", "").split()))
