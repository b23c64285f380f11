"""The DuckDB session: the kernel's connection, notebook tables, ``{{var}}`` and SQL -> Arrow."""

from __future__ import annotations

import contextlib
import datetime as _dt
import decimal
import re
import uuid
from typing import Any, Iterable, Iterator, Mapping

from .errors import NbCustomError

_VAR = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
NO_ROWS = "the query returned no rows: check its WHERE clause and the table's contents"
_FRAME_TYPES = {
    ("pandas", "DataFrame"),
    ("polars", "DataFrame"),
    ("polars", "LazyFrame"),
    ("pyarrow", "Table"),
    ("pyarrow", "RecordBatchReader"),
    ("pyarrow", "Dataset"),
}


def sql_literal(value: Any) -> str:
    """``value`` written as a DuckDB SQL literal (strings quoted, quotes doubled)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (int, float, decimal.Decimal)):
        if isinstance(value, float) and value != value:
            return "'NaN'::DOUBLE"
        return repr(value) if not isinstance(value, decimal.Decimal) else str(value)
    if isinstance(value, _dt.datetime):
        return f"TIMESTAMP '{value.isoformat(sep=' ')}'"
    if isinstance(value, _dt.date):
        return f"DATE '{value.isoformat()}'"
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(sql_literal(v) for v in value) + "]"
    if hasattr(value, "item") and callable(value.item):  # numpy / pandas scalars
        return sql_literal(value.item())
    if hasattr(value, "to_pydatetime"):  # pandas.Timestamp
        return sql_literal(value.to_pydatetime())
    return "'" + str(value).replace("'", "''") + "'"


def render(sql: str, namespace: Mapping[str, Any]) -> str:
    """Replace each ``{{name}}`` with the notebook value ``name`` as a quoted literal."""

    def literal(match: re.Match) -> str:
        name = match.group(1)
        if name not in namespace:
            raise NbCustomError(f"{{{{{name}}}}} in the SQL names no notebook variable: define {name} first")
        return sql_literal(namespace[name])

    return _VAR.sub(literal, sql)


def is_frame(value: Any) -> bool:
    """True for a pandas/polars DataFrame or a pyarrow Table/reader/dataset."""
    cls = type(value)
    return (cls.__module__.split(".")[0], cls.__name__) in _FRAME_TYPES


def frames_in(sql: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The notebook tables the SQL mentions by name."""
    words = {w.lower() for w in _WORD.findall(sql)}
    return {k: v for k, v in namespace.items() if k.lower() in words and not k.startswith("_") and is_frame(v)}


class Session:
    """The kernel's DuckDB connection: ``duckdb``'s default in-memory one, or a database file."""

    def __init__(self, database: str = ":memory:"):
        self.database = database or ":memory:"
        self._con = None

    @property
    def con(self):
        if self._con is None:
            import duckdb

            if self.database == ":memory:":
                # The module's default connection, so `duckdb.sql("CREATE TABLE ...")` in the
                # notebook and the magics see the same tables.
                self._con = duckdb.default_connection()
            else:
                try:
                    self._con = duckdb.connect(self.database)
                except duckdb.Error as e:
                    raise NbCustomError(f"cannot open DuckDB database {self.database!r}: {_first_line(e)[:200]}; check %config NbCustom.database") from None
        return self._con

    def use(self, database: str) -> None:
        """Switch to another database (``%config NbCustom.database``)."""
        database = database or ":memory:"
        if database != self.database:
            if self._con is not None and self.database != ":memory:":
                self._con.close()
            self.database, self._con = database, None

    def query(self, sql: str, namespace: Mapping[str, Any] | None = None, con=None, params: Mapping[str, Any] | None = None):
        """Run one query and return its rows as a ``pyarrow.Table``."""
        return query(con if con is not None else self.con, sql, namespace, params)


def query(con, sql: str, namespace: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None):
    """Run ``sql`` on ``con`` with notebook tables registered; rows as a ``pyarrow.Table``."""
    with _relation(con, sql, namespace, params) as relation:
        return relation.to_arrow_table()


@contextlib.contextmanager
def _relation(con, sql: str, namespace: Mapping[str, Any] | None, params: Mapping[str, Any] | None):
    """The one SELECT of ``sql`` as a DuckDB relation, notebook tables registered while it is
    read; a DuckDB error, also one raised while reading, becomes one line."""
    import duckdb

    namespace = dict(namespace or {})
    values = {**namespace, **(params or {})}
    text = render(sql, values).strip().rstrip(";").strip()
    if not text:
        raise NbCustomError("the cell has no SQL: write a query such as SELECT * FROM my_table")
    existing = {r[0].lower() for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    registered = [name for name, frame in frames_in(text, namespace).items() if name.lower() not in existing]
    try:
        statements = con.extract_statements(text)
        if len(statements) != 1 or statements[0].type.name not in ("SELECT", "MULTI"):
            raise NbCustomError("the cell body must be one SELECT query (no CREATE/INSERT, no second statement)")
        for name in registered:
            con.register(name, namespace[name])
        yield con.sql(text)
    except duckdb.Error as e:
        raise NbCustomError(f"SQL error (check the cell's query): {_first_line(e)[:200]}") from None
    finally:
        for name in registered:
            try:
                con.unregister(name)
            except duckdb.Error:
                pass


def batches(data, size: int, namespace=None, con=None, params=None) -> Iterator[tuple[Any, int]]:
    """SQL text or a table-like value, read ``size`` rows at a time: (``pandas.DataFrame``,
    the total row count) pairs. SQL is read from DuckDB in Arrow record batches, so the
    whole result is never held at once; the first batch comes after the count."""
    if not isinstance(data, str):
        frame = to_pandas(data)
        for start in range(0, len(frame), size):
            yield frame.iloc[start : start + size].reset_index(drop=True), len(frame)
        return
    con = con if con is not None else default_session().con
    with _relation(con, data, namespace, params) as relation:
        total = relation.aggregate("count(*)").fetchall()[0][0]
        if not total:
            raise NbCustomError(NO_ROWS)
        with relation.to_arrow_reader(size) as reader:  # closed, with its result, however the reading ends
            for batch in reader:
                for start in range(0, batch.num_rows, size):
                    yield batch.slice(start, size).to_pandas(), total


SPOOL_BATCH = 10_000  # rows read from DuckDB, written to Parquet and read back at a time


def spool(data, path, namespace=None, con=None, params=None) -> "RowFile":
    """The rows of ``data`` (SQL text or a table-like value) written to the Parquet file
    ``path`` as they are read: a query in DuckDB's Arrow record batches, a DataFrame a slice at
    a time. Read back a batch at a time (``RowFile.batches``), so no step holds every row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if isinstance(data, str):
            con = con if con is not None else default_session().con
            with _relation(con, data, namespace, params) as relation:
                # closed however the loop ends: an open result would block the kernel's next query
                with relation.to_arrow_reader(SPOOL_BATCH) as reader, pq.ParquetWriter(str(path), reader.schema) as writer:
                    for batch in reader:
                        writer.write_batch(batch)
        else:
            frame = to_pandas(data)
            frame = frame.set_axis([str(c) for c in frame.columns], axis=1)  # Parquet names are text
            schema = pa.Schema.from_pandas(frame, preserve_index=False)  # types of whole columns
            with pq.ParquetWriter(str(path), schema) as writer:
                for start in range(0, len(frame), SPOOL_BATCH):
                    writer.write_table(pa.Table.from_pandas(frame.iloc[start : start + SPOOL_BATCH], schema=schema, preserve_index=False))
    except pa.ArrowException as e:  # a type Parquet cannot hold (an INTERVAL), a column of mixed types
        raise NbCustomError(f"cannot keep the rows as Parquet ({_first_line(e)[:120]}): select such a column as text, e.g. CAST(col AS VARCHAR), or leave it out") from None
    rows = RowFile(path)
    if not len(rows):
        raise NbCustomError(NO_ROWS)
    return rows


class RowFile:
    """Rows in a Parquet file (``spool``): their number, columns, Arrow ``schema`` and
    ``sha256`` (``hashing.frame_sha256`` of the rows, fed a batch at a time), and ``batches``
    of them as DataFrames. Pickled to a worker process as the path and these facts."""

    def __init__(self, path):
        import pyarrow.parquet as pq

        from .hashing import frames_sha256

        self.path = path
        self.schema = pq.read_schema(str(path))
        self.columns = [str(c) for c in self.schema.names]
        self._rows = pq.read_metadata(str(path)).num_rows
        self.sha256 = frames_sha256(self.columns, self.batches())

    def __len__(self) -> int:
        return self._rows

    def batches(self, size: int = SPOOL_BATCH) -> Iterator[Any]:
        """``size`` rows at a time as pandas DataFrames (integers with NULLs as Python ints and
        None, so a value converts alike whatever else its batch holds)."""
        import pyarrow.parquet as pq

        with pq.ParquetFile(str(self.path)) as file:
            for batch in file.iter_batches(batch_size=size):
                yield batch.to_pandas(integer_object_nulls=True)


def write_parts(con, table: str, parts: Iterable[tuple[Any, int | None]], keep: int, preview: int, progress) -> tuple[Any, int]:
    """Write each (``pandas.DataFrame``, total rows) of ``parts`` to the DuckDB ``table`` as
    it comes; ``progress(rows so far, total)`` after each. The rows go to a staging table on
    a second connection, which replaces ``table`` once the last part is in: a failure leaves
    ``table`` as it was. Returns the rows written (only the first ``preview`` when there are
    more than ``keep``) and their number."""
    import duckdb
    import pandas as pd

    writer, staging = con.cursor(), f"__nbcustom_into_{uuid.uuid4().hex[:12]}"
    kept, written = [], 0
    try:
        for part, total in parts:
            writer.register("__nbcustom_part", part)
            verb = f'INSERT INTO "{staging}" BY NAME' if written else f'CREATE TABLE "{staging}" AS'
            writer.execute(f"{verb} SELECT * FROM __nbcustom_part")
            writer.unregister("__nbcustom_part")
            kept.append(part)
            written += len(part)
            if written > keep:
                kept = [pd.concat(kept, ignore_index=True).head(preview)]
            progress(written, total)
        if not written:
            raise NbCustomError(NO_ROWS)
        writer.execute(f'BEGIN; DROP TABLE IF EXISTS "{table}"; ALTER TABLE "{staging}" RENAME TO "{table}"; COMMIT')
    except BaseException as e:
        with contextlib.suppress(duckdb.Error):
            writer.execute("ROLLBACK")
        with contextlib.suppress(duckdb.Error):
            writer.execute(f'DROP TABLE IF EXISTS "{staging}"')
        if isinstance(e, duckdb.Error):
            raise NbCustomError(f"cannot write --into {table}: {_first_line(e)[:200]}") from None
        raise
    finally:
        writer.close()
    return pd.concat(kept, ignore_index=True), written


def to_pandas(data, session: Session | None = None, namespace=None, con=None, params=None):
    """SQL text or a table-like value -> ``pandas.DataFrame`` (Arrow-backed conversion)."""
    if isinstance(data, str):
        session = session or default_session()
        data = session.query(data, namespace, con=con, params=params)
    if hasattr(data, "to_pandas"):  # pyarrow / polars
        return data.to_pandas()
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return data.reset_index(drop=True)
    raise NbCustomError(f"data must be SQL text or a DataFrame, not {type(data).__name__}")


_DEFAULT: Session | None = None


def default_session() -> Session:
    """The session the Python API uses when no magic set one up."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = Session()
    return _DEFAULT


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
