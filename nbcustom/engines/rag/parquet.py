"""RAG export: an index version as one Parquet file, one row per chunk.

Columns: ``chunk_id``, ``row_id``, ``position`` (chunk number within its row), ``hash``
(the row's content hash), ``text`` (the chunk), ``metadata`` (JSON), ``embedding`` (the
vector), and ``row``: the indexed row as it was read, a struct of its columns. The
embedding model's name, the vector size and the chunking options are in the file's
key-value metadata (``nbcustom``, JSON), so a reader can embed queries the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from .index import key
from .stores import duckdb as rag_store


def export(version, folder: Path, spec) -> list[str]:
    import duckdb
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    con = duckdb.connect(str(version.model_dir / rag_store.FILE), read_only=True)
    try:
        chunks = con.sql("SELECT * FROM chunks ORDER BY row_id, position").to_arrow_table()
    finally:
        con.close()
    info, options = version.manifest.get("index", {}), version.manifest.get("options", {})
    rows = pd.read_parquet(version.path / "train.parquet").drop(columns="content_hash", errors="ignore")
    by_id = {key(i): r for i, r in zip(rows[info.get("id_column", "id")], pa.Table.from_pandas(rows, preserve_index=False).to_pylist())}
    row_of = [by_id.get(r) for r in chunks.column("row_id").to_pylist()]
    table = chunks.append_column("row", pa.array(row_of))
    about = {
        "name": version.name, "version": version.version, "embed_model": info.get("embed_model"), "dim": info.get("dim"),
        "chunk_size": options.get("chunk_size"), "chunk_overlap": options.get("chunk_overlap"),
        "id_column": info.get("id_column"), "text_columns": info.get("text_columns"), "metadata_columns": info.get("metadata_columns"),
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"nbcustom": json.dumps(about).encode()})
    path = folder / f"{version.name}-v{version.version}.parquet"
    pq.write_table(table, path)
    return [
        f"{path.name}: {table.num_rows} chunks of {len(rows)} rows with {info.get('dim')}-d vectors from {info.get('embed_model')}, {path.stat().st_size / 2**20:.1f} MiB",
        "the embedding model and chunking options are in the file's key-value metadata 'nbcustom'",
    ]
