"""%%rag with its vectors in PostgreSQL + pgvector (``--vector-store postgresql://...``),
against a real server started by the tests (``postgres.py``): the DuckDB backend's
behaviour holds (refresh counts, removed rows, hit rate, a fresh process), pgvector ranks
like DuckDB, versions own their tables, passwords never reach the store, errors are one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import nbcustom
from nbcustom.errors import NbCustomError
from nbcustom.store import Store, Version

from conftest import snapshot
from postgres import PASSWORD, free_port, postgres  # noqa: F401  (the session's server)
from rag_facts import FACTS, QUESTIONS, facts_frame
from test_rag import AGENTS, FIFTY, embedded_documents, ids

SMALL = FACTS[:4]


def table_of(version) -> str:
    return version.manifest["index"]["store"]["table"]


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_urls_lose_their_password_and_messages_mask_it():
    from nbcustom import credentials

    url = "postgresql://ana:s%40lt%3Ay@db.example.com:6543/search"
    assert credentials.strip(url) == "postgresql://ana@db.example.com:6543/search"
    assert credentials.password(credentials.server(url)) == "s@lt:y"
    assert credentials.server("postgres://ana@db.example.com/search") == {
        "host": "db.example.com", "port": 5432, "database": "search", "user": "ana"}
    assert credentials.strip("postgresql://bo@[::1]:5433/x?password=q-9") == "postgresql://bo@[::1]:5433/x"
    assert credentials.password({"user": "bo", "host": "::1", "port": 5433}) == "q-9"
    assert credentials.mask(f"failed for {url} with s@lt:y") == "failed for postgresql://ana:***@db.example.com:6543/search with ***"
    for bad in ("mysql://ana@h/db", "postgresql://ana:pw@h:port/db", "postgresql://ana:pw@h:99999/db", "postgresql://ana:pw@h/db?nonsense=1"):
        with pytest.raises(NbCustomError, match="not understood") as error:
            credentials.strip(bad)
        assert "pw" not in str(error.value)


def test_every_url_form_libpq_accepts(monkeypatch):
    """A Unix socket (host= in the query), libpq's defaults, the password as a parameter."""
    from nbcustom import credentials

    for variable in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE"):
        monkeypatch.delenv(variable, raising=False)
    socket = "postgresql://nbc:Pw-1@/postgres?host=/run/postgresql"
    assert credentials.strip(socket) == "postgresql://nbc@/postgres?host=/run/postgresql"
    assert credentials.server(socket) == {"host": "/run/postgresql", "port": 5432, "database": "postgres", "user": "nbc"}
    assert credentials.password(credentials.server(socket)) == "Pw-1"
    assert "the socket in /run/postgresql" in credentials.where(credentials.server(socket))
    monkeypatch.setenv("PGUSER", "ops")
    assert credentials.server("postgresql:///db") == {"host": "", "port": 5432, "database": "db", "user": "ops"}
    assert credentials.strip("postgresql:///db?host=/tmp&password=x%26y&port=5433") == "postgresql:///db?host=/tmp&port=5433"
    assert credentials.password({"user": "ops", "host": "/tmp", "port": 5433}) == "x&y"


# --- the store interface, both backends, no model ------------------------------------------------
@pytest.mark.parametrize("backend", ["duckdb", "pgvector"])
def test_store_interface_writes_copies_and_searches_like_a_matrix_product(tmp_path, postgres, backend):  # noqa: F811
    from nbcustom.engines.rag import stores

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    chunks = [{"chunk_id": f"r{i}#0", "row_id": f"r{i}", "position": 0, "hash": f"h{i}", "text": f"text {i}",
               "metadata": {"n": i}} for i in range(300)]
    location = "duckdb" if backend == "duckdb" else postgres.url(password=True)

    def write(folder, rows, previous=None, copy=()):
        folder.mkdir()
        (folder / "model").mkdir()
        writer = stores.create(location if previous is None else None, previous, "t", folder / "model", 16)
        writer.insert([chunks[i] for i in rows], vectors[rows])
        copied = writer.copy(list(copy)) if copy else 0
        entry, total = writer.finish()
        return Version("t", int(folder.name[1:]), folder, {"kind": "rag", "index": {"store": entry}}), copied, total

    v1, _, total = write(tmp_path / "v1", list(range(300)))
    assert total == 300 and stores.row_hashes(v1) == {f"r{i}": f"h{i}" for i in range(300)}
    # a refresh: 2 rows written, 200 copied where they are, the rest gone
    v2, copied, total = write(tmp_path / "v2", [0, 1], previous=v1, copy=[f"r{i}" for i in range(100, 300)])
    assert (copied, total) == (200, 202) and v2.manifest["index"]["store"]["backend"] == backend

    found = stores.open(v2)
    assert len(found) == 202 and found.chunk_ids == sorted(found.chunk_ids)  # bytewise, like DuckDB
    order = [int(c[1:-2]) for c in found.chunk_ids]
    assert found.texts[5] == f"text {order[5]}" and found.metadata(5) == {"n": order[5]}
    unit = vectors[order] / np.linalg.norm(vectors[order], axis=1, keepdims=True)
    among = list(range(0, 202, 3))
    for _ in range(5):
        query = rng.standard_normal(16).astype(np.float32)
        exact = unit @ (query / np.linalg.norm(query))
        hits = found.search(query, 5)
        assert [i for i, _ in hits] == list(np.argsort(-exact)[:5])  # HNSW finds the true 5 at this size
        assert np.allclose([s for _, s in hits], np.sort(exact)[::-1][:5], atol=1e-5)
        within = found.search(query, 5, among=np.asarray(among))  # exact within the given chunks
        assert [i for i, _ in within] == [among[j] for j in np.argsort(-exact[among])[:5]]
    assert found.search(query, 0) == [] and len(found.search(query, 500)) == 202
    if backend == "pgvector":
        stores.release(v1)
        stores.release(v2)
        assert postgres.tables() == set()


# --- the DuckDB tests' meaning, on the server -------------------------------------------------
def test_refresh_on_pgvector_embeds_only_new_and_changed_rows_and_forgets_removed_ones(ip, store_dir, postgres):  # noqa: F811
    url = postgres.url(password=True)
    ip.user_ns["facts"] = facts_frame(FIFTY)
    ip.run_cell_magic("rag", f"facts --metadata topic --vector-store {url}", "SELECT * FROM facts")
    v1 = Store(store_dir).get("facts")
    assert v1.manifest["index"]["store"] == {
        "backend": "pgvector", "url": postgres.url(), "host": postgres.host, "port": postgres.port,
        "database": postgres.database, "user": postgres.user, "schema": "public", "table": table_of(v1), "dim": 384,
    }
    assert not list((v1.path / "model").iterdir())  # the vectors are on the server only
    (indexdef,) = postgres.sql("SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexdef LIKE %s",
                               [table_of(v1), "%hnsw%"])[0]
    assert "vector_cosine_ops" in indexdef
    tower = "What is the tallest tower in Dunmarrow?"
    assert ids(nbcustom.load("facts", store=store_dir).retrieve([tower], 3)[0])[0] == 7

    rows = [r for r in FIFTY if r[0] != 7]  # removed
    rows = [(5, "The inventor of the glimmerwheel was Pia Lorrent.", "people") if r[0] == 5 else r for r in rows]  # changed
    rows.append((51, "The harbor master of Port Ellisande is Gunnar Vey.", "people"))  # added
    ip.user_ns["facts"] = facts_frame(rows)
    start = embedded_documents()
    ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")  # stays where v1's vectors are
    embedded = embedded_documents() - start

    v2 = Store(store_dir).get("facts")
    counts = v2.manifest["counts"]
    assert (v2.version, counts["added"], counts["changed"], counts["removed"], counts["unchanged"]) == (2, 1, 1, 1, 48)
    assert counts["embedded"] == 2 and counts["chunks_embedded"] == embedded == 2
    assert counts["chunks"] == 50 and counts["chunks_copied"] == 48
    assert v2.manifest["index"]["store"]["backend"] == "pgvector" and table_of(v2) != table_of(v1)
    assert postgres.sql(f'SELECT count(*) FROM "{table_of(v2)}"')[0][0] == 50
    assert postgres.sql(f'SELECT count(*) FROM "{table_of(v1)}"')[0][0] == 50  # v1 is untouched
    index = nbcustom.load("facts", store=store_dir)
    assert 7 not in ids(index.retrieve([tower], 10)[0])
    assert all(s["id"] != 7 for found in index.retrieve([f[1] for f in FACTS], 5) for s in found)
    assert "Pia Lorrent" in index.retrieve(["Who invented the glimmerwheel?"], 1)[0][0]["snippet"]
    assert ids(index.retrieve(["Who is the harbor master of Port Ellisande?"], 1)[0]) == [51]

    start = embedded_documents()
    ip.run_cell_magic("rag", "facts --metadata topic --append", "SELECT * FROM facts WHERE id <= 10")
    counts = Store(store_dir).get("facts").manifest["counts"]
    assert embedded_documents() == start
    assert (counts["embedded"], counts["removed"], counts["kept"], counts["chunks"]) == (0, 0, 41, 50)
    # moving to the DuckDB file copies nothing across: every row is embedded again
    ip.run_cell_magic("rag", "facts --metadata topic --vector-store duckdb", "SELECT * FROM facts WHERE id <= 10")
    moved = Store(store_dir).get("facts")
    assert (moved.manifest["counts"]["embedded"], moved.manifest["counts"]["chunks_copied"]) == (9, 0)  # 1-10 but 7
    assert moved.manifest["index"]["store"]["backend"] == "duckdb"


def test_pgvector_finds_the_same_top_k_as_duckdb_and_the_same_hit_rate(tmp_path, postgres):  # noqa: F811
    from llama_index.vector_stores.postgres import PGVectorStore

    rows = facts_frame(FIFTY)
    nbcustom.rag("facts", rows, store=tmp_path / "duck", ui="none", metadata="topic")
    nbcustom.rag("facts", rows, store=tmp_path / "pg", ui="none", metadata="topic", vector_store=postgres.url(password=True))
    duck, pg = nbcustom.load("facts", store=tmp_path / "duck"), nbcustom.load("facts", store=tmp_path / "pg")
    assert isinstance(pg.as_llama_index().vector_store, PGVectorStore)  # retrieval goes through llama-index's own store

    # the same query vectors searched in both stores
    questions = [q for q, _, _ in QUESTIONS] + [f"Which locker does agent {name} keep?" for name in AGENTS]
    embed_model = duck.embed_model()
    queries = [embed_model.get_query_embedding(q) for q in questions]

    def top(index, query, k=4, among=None):
        return [index.vectors.row_ids[i] for i, _ in index.vectors.search(query, k, among=among)]

    same = np.mean([top(duck, q) == top(pg, q) for q in queries])
    assert same >= 0.95, same
    # RagIndex.retrieve's vector ranking on the server: the same rows as the store's search
    retrieved = pg.retrieve(questions[: len(QUESTIONS)], 4, search="vector")
    assert [[str(i) for i in ids(found)] for found in retrieved] == [top(pg, q) for q in queries[: len(QUESTIONS)]]
    hit = {name: np.mean([str(sid) in top(index, q, 3) for (_, _, sid), q in zip(QUESTIONS, queries)]) for name, index in (("duckdb", duck), ("pgvector", pg))}
    assert hit["pgvector"] == hit["duckdb"] >= 0.8
    lockers = [i for i in range(len(pg.vectors)) if pg.vectors.metadata(i)["topic"] == "lockers"]
    assert top(duck, queries[0], 3, lockers) == top(pg, queries[0], 3, lockers)
    assert set(top(pg, queries[0], 3, lockers)) <= {pg.vectors.row_ids[i] for i in lockers}


@pytest.mark.slow
def test_a_fresh_process_answers_from_pgvector_without_embedding(tmp_path, postgres):  # noqa: F811
    store = tmp_path / "store"
    nbcustom.rag("facts", facts_frame(), store=store, ui="none", top_k=2, max_new_tokens=24, vector_store=postgres.url(password=True))
    questions = [QUESTIONS[0][0], QUESTIONS[4][0]]
    here = nbcustom.ask("facts", questions, store=store)

    script = textwrap.dedent(
        f"""
        import json, nbcustom
        from nbcustom.engines.rag import models as rag_models
        answers = nbcustom.ask("facts", {questions!r}, store={str(store)!r})
        print(json.dumps({{"answers": answers["answer"].tolist(), "sources": [[s["id"] for s in f] for f in answers["sources"]],
                          "calls": rag_models.EMBED_CALLS}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "NBCUSTOM_VECTOR_STORE")}
    env.update(HF_HUB_OFFLINE="1", PGPASSWORD=PASSWORD)  # the password as libpq reads it
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["calls"] == {"documents": 0, "queries": 2}
    assert there["answers"] == here["answer"].tolist()
    assert there["sources"] == [[s["id"] for s in f] for f in here["sources"]]


# --- settings and passwords ---------------------------------------------------------------------
def test_a_unix_socket_url_builds_refreshes_and_answers(ip, store_dir, postgres):  # noqa: F811
    """The usual form for a server on the same machine: no host, the socket directory as ``host=``."""
    from urllib.parse import quote

    socket = f"postgresql://{postgres.user}:{quote(PASSWORD, safe='')}@/{postgres.database}?host={postgres.socket_dir}&port={postgres.port}"
    ip.user_ns["facts"] = facts_frame(FIFTY)
    ip.run_cell_magic("rag", f"facts --metadata topic --vector-store {socket}", "SELECT * FROM facts")
    v1 = Store(store_dir).get("facts")
    entry = v1.manifest["index"]["store"]
    assert entry["url"] == f"postgresql://{postgres.user}@/{postgres.database}?host={postgres.socket_dir}&port={postgres.port}"
    assert (entry["host"], entry["port"], entry["user"]) == (postgres.socket_dir, postgres.port, postgres.user)
    assert postgres.sql(f'SELECT count(*) FROM "{table_of(v1)}"')[0][0] == 50
    tower = "What is the tallest tower in Dunmarrow?"
    assert ids(nbcustom.load("facts", store=store_dir).retrieve([tower], 3)[0])[0] == 7
    # libpq's defaults filled from the query alone; the same server, so the refresh copies on it
    bare = f"postgresql:///{postgres.database}?host={postgres.socket_dir}&port={postgres.port}&user={postgres.user}"
    ip.run_cell_magic("rag", f"facts --metadata topic --vector-store {bare}", "SELECT * FROM facts WHERE id <> 7")
    counts = Store(store_dir).get("facts").manifest["counts"]
    assert (counts["chunks_copied"], counts["embedded"], counts["removed"]) == (49, 0, 1)
    assert 7 not in ids(nbcustom.load("facts", store=store_dir).retrieve([tower], 5)[0])


def test_a_password_in_the_url_reaches_no_file_and_no_output(ip, store_dir, postgres, capsys, monkeypatch):  # noqa: F811
    secrets = {PASSWORD, PASSWORD.replace(":", "%3A").replace("@", "%40")}
    ip.user_ns["facts"] = facts_frame(SMALL)
    ip.run_line_magic("config", f"NbCustom.vector_store = {postgres.url(password=True)!r}")
    try:
        assert ip.magics_manager.registry["NbCustom"].vector_store == postgres.url()  # as %config shows it
        ip.run_line_magic("config", "NbCustom")
        ip.run_cell_magic("rag", "facts", "SELECT * FROM facts")  # the %config setting
    finally:
        ip.run_line_magic("config", "NbCustom.vector_store = ''")
    ip.user_ns["facts"] = facts_frame(SMALL[:3])
    ip.run_cell_magic("rag", f"facts --vector-store {postgres.url(password=True)}", "SELECT * FROM facts")
    monkeypatch.setenv("NBCUSTOM_VECTOR_STORE", postgres.url(password=True))
    nbcustom.rag("other", facts_frame(SMALL), store=store_dir, ui="text")  # the environment variable
    for command in ("list", "show facts@1", "versions facts", "runs"):
        shown = ip.run_line_magic("nbc", command)
        assert not any(s in repr(shown) for s in secrets)
    with pytest.raises(NbCustomError) as error:  # an error with the password in the URL
        nbcustom.rag("broken", facts_frame(SMALL), store=store_dir, ui="none",
                     vector_store=postgres.url(password=True, database="missing"))
    assert "missing" in one_line(error) and f"{postgres.host}:{postgres.port}" in str(error.value)

    store = Store(store_dir)
    assert [v.manifest["index"]["store"]["backend"] for v in (store.get("facts", 1), store.get("facts", 2), store.get("other"))] == ["pgvector"] * 3
    out = capsys.readouterr()
    assert not any(s in out.out + out.err + str(error.value) for s in secrets)
    files = [p for p in store_dir.rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path


# --- errors ---------------------------------------------------------------------------------------
def test_unreachable_server_missing_extension_and_bad_url_are_one_line_and_change_nothing(ip, store_dir, postgres):  # noqa: F811
    ip.user_ns["facts"] = facts_frame(SMALL)
    ip.run_cell_magic("rag", "facts", "SELECT * FROM facts")
    state, tables = snapshot(store_dir), postgres.tables()
    port = free_port()
    with pytest.raises(NbCustomError) as error:
        ip.run_cell_magic("rag", f"facts --vector-store postgresql://nbc@127.0.0.1:{port}/nbc", "SELECT * FROM facts")
    assert f"127.0.0.1:{port}" in one_line(error) and "start the server" in str(error.value)
    with pytest.raises(NbCustomError) as error:
        ip.run_cell_magic("rag", f"facts --vector-store {postgres.url(password=True, database=postgres.bare_database)}", "SELECT * FROM facts")
    assert f"{postgres.host}:{postgres.port}" in one_line(error) and "CREATE EXTENSION vector" in str(error.value)
    with pytest.raises(NbCustomError, match="not understood: use duckdb .* or postgresql://USER@HOST:PORT/DB"):
        ip.run_cell_magic("rag", "facts --vector-store mysql://nbc@127.0.0.1/nbc", "SELECT * FROM facts")
    assert snapshot(store_dir) == state and postgres.tables() == tables


def test_a_version_whose_table_is_gone_is_one_line_and_can_be_removed(ip, store_dir, postgres):  # noqa: F811
    ip.user_ns["facts"] = facts_frame(SMALL)
    ip.run_cell_magic("rag", f"facts --vector-store {postgres.url(password=True)}", "SELECT * FROM facts")
    table = table_of(Store(store_dir).get("facts"))
    postgres.sql(f'DROP TABLE "{table}"')
    with pytest.raises(NbCustomError) as error:
        nbcustom.load("facts", store=store_dir)
    assert table in one_line(error) and "%nbc rm facts@1" in str(error.value)
    state = snapshot(store_dir)
    with pytest.raises(NbCustomError, match="is gone"):  # a refresh reads the old table too
        ip.run_cell_magic("rag", "facts", "SELECT * FROM facts")
    assert snapshot(store_dir) == state
    ip.run_line_magic("nbc", "rm facts@1")
    assert Store(store_dir).models() == []


def test_nbc_rm_drops_the_versions_tables_and_refuses_when_the_server_is_unreachable(ip, store_dir, postgres):  # noqa: F811
    ip.user_ns["facts"] = facts_frame(SMALL)
    ip.run_cell_magic("rag", f"facts --vector-store {postgres.url(password=True)}", "SELECT * FROM facts")
    ip.user_ns["facts"] = facts_frame(SMALL[:3])
    ip.run_cell_magic("rag", "facts", "SELECT * FROM facts")
    store = Store(store_dir)
    v1, v2 = table_of(store.get("facts", 1)), table_of(store.get("facts", 2))
    assert {v1, v2} <= postgres.tables()

    ip.run_line_magic("nbc", "rm facts@1")
    assert v1 not in postgres.tables() and v2 in postgres.tables()
    assert len(nbcustom.load("facts", store=store_dir).vectors) == 3

    manifest = store_dir / "facts" / "v2" / "manifest.json"  # the server moved away
    moved = json.loads(manifest.read_text())
    entry, gone = moved["index"]["store"], free_port()
    entry["url"], entry["port"] = entry["url"].replace(f":{postgres.port}/", f":{gone}/"), gone  # connections use the URL
    manifest.write_text(json.dumps(moved))
    state = snapshot(store_dir)
    with pytest.raises(NbCustomError, match="cannot connect"):
        ip.run_line_magic("nbc", "rm facts")
    assert snapshot(store_dir) == state and v2 in postgres.tables()
    entry["url"], entry["port"] = entry["url"].replace(f":{gone}/", f":{postgres.port}/"), postgres.port
    manifest.write_text(json.dumps(moved))
    ip.run_line_magic("nbc", "rm facts")
    assert v2 not in postgres.tables() and store.models() == []


def test_an_interrupted_build_drops_its_table(tmp_path, postgres):  # noqa: F811
    from nbcustom.display import RunDisplay
    from nbcustom.engines import rag
    from nbcustom.specs import RagSpec

    store, tables = Store(tmp_path / "store"), postgres.tables()
    spec = RagSpec.from_options(vector_store=postgres.url(password=True))
    with pytest.raises(KeyboardInterrupt):
        with store.build("facts", "rag") as build:
            rag.build(spec, facts_frame(SMALL), None, build, RunDisplay("test"))
            assert len(postgres.tables()) == len(tables) + 1
            raise KeyboardInterrupt  # Ctrl-C before the version is committed
    assert postgres.tables() == tables and not store.root.exists()
