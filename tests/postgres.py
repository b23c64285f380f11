"""A real PostgreSQL 16 with pgvector for the tests, started once per test session.

``pgserver`` (a PyPI wheel bundling PostgreSQL 16.2 and pgvector 0.6.2) initializes and
starts the server in a temporary folder; it starts it listening on a Unix socket only, so the
fixture restarts it on a free TCP port of 127.0.0.1 with password (scram-sha-256) logins,
the way a shared server is used. It has a login role with a password, a database with the
``vector`` extension and one without. Use it with ``from postgres import postgres`` (the
session fixture), or ``with postgres.start() as server`` (the benchmarks).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

USER, PASSWORD = "nbc", "Pw-7f3k9q:x@z"  # ':' and '@' must survive URL quoting


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    password: str
    database: str  # has the vector extension
    bare_database: str  # has not, and the role may not create it
    socket_dir: str

    def url(self, password: bool = False, database: str | None = None) -> str:
        """``postgresql://USER[:PASSWORD]@HOST:PORT/DB``."""
        from urllib.parse import quote

        secret = f":{quote(self.password, safe='')}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database or self.database}"

    def sql(self, query: str, params=None, database: str | None = None) -> list[tuple]:
        """Run ``query`` as the superuser (through the socket) and return its rows."""
        import psycopg

        with psycopg.connect(host=self.socket_dir, port=self.port, user="postgres", dbname=database or self.database, autocommit=True) as con:
            cur = con.execute(query, params)
            return cur.fetchall() if cur.description else []

    def tables(self) -> set[str]:
        """The tables nbcustom made in the test database."""
        return {r[0] for r in self.sql("SELECT tablename FROM pg_tables WHERE tablename LIKE 'data_nbcustom_%'")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def start() -> Iterator[Postgres]:
    """Start the server in a temporary folder; stop it and remove the folder after."""
    import psycopg

    with warnings.catch_warnings():  # platformdirs on a machine without XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        import pgserver

    folder = Path(tempfile.mkdtemp(prefix="nbcustom-pg-"))
    pgdata = folder / "pgdata"
    # cleanup_mode=None: this function stops the restarted server and removes the folder itself
    server = pgserver.get_server(pgdata, cleanup_mode=None)
    socket_dir = str(server.get_postmaster_info().socket_dir)
    port = free_port()
    (pgdata / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    pgserver.pg_ctl(["-w", "-o", f"-h 127.0.0.1 -p {port} -k {socket_dir}", "-l", str(server.log), "restart"],
                    pgdata=pgdata, user=server.system_user)
    try:
        with psycopg.connect(host=socket_dir, port=port, user="postgres", dbname="postgres", autocommit=True) as con:
            con.execute(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            con.execute(f"CREATE DATABASE nbc OWNER {USER}")
            con.execute(f"CREATE DATABASE bare OWNER {USER}")
        with psycopg.connect(host=socket_dir, port=port, user="postgres", dbname="nbc", autocommit=True) as con:
            con.execute("CREATE EXTENSION vector")
        yield Postgres("127.0.0.1", port, USER, PASSWORD, "nbc", "bare", socket_dir)
    finally:
        pgserver.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=server.system_user)
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    with start() as server:
        yield server
