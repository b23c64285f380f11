"""The catalog file ``catalog.duckdb``: its schema, connections, and its rebuild from the
version folders when it does not open.

Reads open it read-only and run no DDL, so a user who may only read the store can list and
load, and a read never rewrites the file: a catalog with an older schema is read through an
upgraded copy in memory until the next write upgrades the file under the store lock.

The catalog is an index of the folders. Everything in it but the jobs and the runs that made
no version can be rebuilt from them (each manifest holds its version's row and run, and
``.active/NAME`` the active version), so a catalog that does not open is moved aside and
rebuilt instead of stopping the store. DuckDB itself survived 300 SIGKILLs of a writer
without a broken file (tests/benchmarks/RESULTS.md); what breaks a catalog is a disk or a
person, and the rebuild covers both.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from .files import fsync_dir
from .layout import read_active, read_manifest, version_folders

FILE = "catalog.duckdb"
TABLES = ("models", "versions", "runs", "jobs")
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name VARCHAR PRIMARY KEY, kind VARCHAR, active INTEGER, created TIMESTAMP, updated TIMESTAMP);
CREATE TABLE IF NOT EXISTS versions (
    name VARCHAR, version INTEGER, kind VARCHAR, status VARCHAR, created TIMESTAMP,
    rows_trained BIGINT, metrics JSON, PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS runs (
    id VARCHAR PRIMARY KEY, name VARCHAR, magic VARCHAR, started TIMESTAMP, ended TIMESTAMP,
    status VARCHAR, rows_read BIGINT, version INTEGER, error VARCHAR);
CREATE TABLE IF NOT EXISTS jobs (
    name VARCHAR PRIMARY KEY, every_seconds DOUBLE, track VARCHAR, last_value JSON,
    database VARCHAR, status VARCHAR, next_due TIMESTAMP, created TIMESTAMP);
ALTER TABLE versions ADD COLUMN IF NOT EXISTS promotion VARCHAR;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS promotion VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS promote VARCHAR;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS min_rows BIGINT;
"""
# What DuckDB says when the file's bytes cannot be read (seen: flipped bytes, a truncated
# file, a file that is not DuckDB's); the errors of a lock or a permission are never that.
_BROKEN = ("corrupt", "checksum", "not a valid duckdb", "could not read enough bytes", "version number",
           "storage version", "serializ", "magic bytes", "unexpected end")
_NOT_BROKEN = ("could not set lock", "conflicting lock", "permission denied", "not permitted", "read-only file system",
               "no space left", "out of memory", "interrupt")


def connect(path: Path):
    """A read-write connection with the current schema (call under the exclusive store lock).
    Every column of every table is read once, so a damaged block is found here, before a
    write relies on the file."""
    import duckdb

    con = duckdb.connect(str(path))
    try:
        con.execute(SCHEMA)
        for table in TABLES:
            con.execute(f"SELECT count(*), max(hash(COLUMNS(*))) FROM {table}").fetchall()
    except BaseException:
        con.close()
        raise
    return con


def in_memory():
    """An empty catalog in memory (what a read-only user reads when the file does not open)."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute(SCHEMA)
    return con


def read(path: Path, sql: str, params: list) -> list[dict]:
    """Rows of ``sql`` from the file opened read-only (an older schema: from an upgraded copy)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        return rows(con, sql, params)
    except (duckdb.BinderException, duckdb.CatalogException):
        pass  # a column or table this version added: read through an upgraded copy
    finally:
        con.close()
    con = upgraded_copy(path)
    try:
        return rows(con, sql, params)
    finally:
        con.close()


def open_read(path: Path):
    """The file opened read-only with every table read once (so damage shows here), or an
    upgraded copy in memory if it lacks a table."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        for table in TABLES:
            con.execute(f"SELECT count(*), max(hash(COLUMNS(*))) FROM {table}").fetchall()
        return con
    except duckdb.CatalogException:
        con.close()
        return upgraded_copy(path)
    except BaseException:
        con.close()
        raise


def upgraded_copy(path: Path):
    """The catalog's tables copied into memory and brought to the current schema."""
    import duckdb

    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH '{_quote(path)}' AS old (READ_ONLY)")
        for (table,) in con.execute("SELECT table_name FROM duckdb_tables() WHERE database_name = 'old'").fetchall():
            con.execute(f'CREATE TABLE memory.main."{table}" AS SELECT * FROM old.main."{table}"')
        con.execute("DETACH old")
        con.execute(SCHEMA)
    except BaseException:
        con.close()
        raise
    return con


def in_use(error: BaseException) -> bool:
    """Whether DuckDB refused the file because another process holds it."""
    message = str(error).lower()
    return "could not set lock" in message or "conflicting lock" in message


def rows(con, sql: str, params: list) -> list[dict]:
    cur = con.execute(sql, params)
    cols = [d[0] for d in cur.description]
    return [dict(zip(cols, row)) for row in cur.fetchall()]


def is_broken(error: BaseException) -> bool:
    """Whether a DuckDB error means the file's bytes cannot be read (corrupt, truncated, a
    format this DuckDB cannot read), as opposed to a lock, a permission or a bad query. An
    I/O error counts only when DuckDB says so: moving a good catalog aside loses its jobs."""
    import duckdb

    message = str(error).lower()
    if any(words in message for words in _NOT_BROKEN):
        return False
    if type(error) in (duckdb.SerializationException, duckdb.InternalException, duckdb.FatalException):
        return True
    return type(error) in (duckdb.Error, duckdb.IOException) and any(words in message for words in _BROKEN)


def move_aside(path: Path) -> Path:
    """Rename a broken catalog (and its WAL, which belongs to it) to ``FILE.broken-STAMP``."""
    target = path.with_name(f"{path.name}.broken-{_dt.datetime.now():%Y%m%d-%H%M%S}")
    n = 1
    while target.exists():
        n += 1
        target = target.with_name(f"{path.name}.broken-{_dt.datetime.now():%Y%m%d-%H%M%S}-{n}")
    os.replace(path, target)
    wal = path.with_name(path.name + ".wal")
    if wal.exists():
        os.replace(wal, target.with_name(target.name + ".wal"))
    fsync_dir(path.parent)
    return target


def record_version(con, manifest: dict, activate: bool, when=None) -> None:
    """Insert a committed version's rows: the version, its model (if new; active if
    ``activate`` or the first), and the run that made it. The manifest holds all of it,
    which is what lets a rebuild and a roll-forward write the same rows as a commit."""
    name, version, kind = manifest["name"], manifest["version"], manifest["kind"]
    when = when or manifest.get("created") or _dt.datetime.now()
    counts = manifest.get("counts") or {}
    promotion = (manifest.get("promotion") or {}).get("reason")
    con.execute(
        """INSERT INTO versions (name, version, kind, status, created, rows_trained, metrics, promotion)
           VALUES (?, ?, ?, 'ready', ?, ?, ?, ?)""",
        [name, version, kind, when, counts.get("trained"), json.dumps(manifest.get("metrics", {}), default=str), promotion],
    )
    if con.execute("SELECT 1 FROM models WHERE name = ?", [name]).fetchone() is None:
        con.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)", [name, kind, version, when, when])
    elif activate:
        con.execute("UPDATE models SET active = ?, updated = ? WHERE name = ?", [version, when, name])
    run = manifest.get("run")
    if run and con.execute("SELECT 1 FROM runs WHERE id = ?", [run["id"]]).fetchone() is None:
        con.execute(
            """INSERT INTO runs (id, name, magic, started, ended, status, rows_read, version, error, promotion)
               VALUES (?, ?, ?, ?, ?, 'ok', ?, ?, NULL, ?)""",
            [run["id"], name, run.get("magic"), run.get("started"), when, counts.get("read"), version, promotion],
        )


def rebuild(con, root: Path) -> tuple[int, int, set[str]]:
    """Fill an empty catalog from the version folders; (models, versions, run ids) recorded.
    A folder without a readable manifest of its own name and number is not a version."""
    versions, run_ids = 0, set()
    folders = version_folders(root)
    con.execute("BEGIN TRANSACTION")
    for name, numbers in folders.items():
        recorded = []
        for version, folder in numbers.items():
            manifest = read_manifest(folder)
            if not manifest or manifest.get("name") != name or manifest.get("version") != version or "kind" not in manifest:
                continue
            record_version(con, manifest, activate=True)
            recorded.append(version)
            run_ids.add((manifest.get("run") or {}).get("id"))
        active = read_active(root, name)
        if recorded and active in recorded:
            con.execute("UPDATE models SET active = ? WHERE name = ?", [active, name])
        versions += len(recorded)
    con.execute("COMMIT")
    models = con.execute("SELECT count(*) FROM models").fetchone()[0]
    return models, versions, run_ids - {None}


def lost(broken: Path, rebuilt_runs: set[str]) -> str:
    """What the rebuild could not bring back, counted from the broken file if it still reads."""
    import duckdb

    try:
        con = duckdb.connect(str(broken), read_only=True)
        try:
            jobs = con.execute("SELECT count(*) FROM jobs").fetchone()[0]
            runs = sum(1 for (run,) in con.execute("SELECT id FROM runs").fetchall() if run not in rebuilt_runs)
        finally:
            con.close()
    except Exception:  # the broken file cannot say
        return "jobs and runs that made no version are lost (the broken file cannot be read to count them)"
    return f"lost: {jobs} jobs, {runs} runs that made no version"


def _quote(path: Path) -> str:
    return str(path).replace("'", "''")
