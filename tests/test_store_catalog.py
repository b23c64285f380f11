"""The folders are the truth: a catalog that does not open is rebuilt from them with one
line; reads open the catalog read-only; writers and readers in several processes."""

import contextlib
import datetime as dt
import os
import shutil
import stat
import subprocess
import sys
import time

import duckdb
import pytest

from nbcustom.store import ReadOnlyStore, Store
from test_store import save

BLOCK = 262144  # DuckDB's block size: one flipped byte in each block breaks every block's checksum


def _store_with_history(store_dir) -> Store:
    """m: three versions, v1 active (not the newest); n: two versions, one made by a run;
    a run that made no version and a job, which a rebuild cannot bring back."""
    store = Store(store_dir)
    for _ in range(3):
        save(store, "m")
    store.activate("m", 1)
    save(store, "n", kind="rag")
    with store.build("n", "rag") as build:
        (build.model_dir / "index.bin").write_bytes(b"index")
        build.manifest.update({"metrics": {"after": {"hit_rate@k": 1.0}}, "counts": {"read": 7, "trained": 7},
                               "run": {"id": "run-n-2", "magic": "rag", "started": "2026-12-02T10:00:00"},
                               "promotion": {"reason": "first version"}})
    store.record_run("m", "job", dt.datetime.now(), "nothing new")
    store.save_job({"name": "m", "every_seconds": 60.0, "status": "active", "next_due": dt.datetime.now(), "created": dt.datetime.now()})
    return store


def _flip_every_block(path):
    data = bytearray(path.read_bytes())
    for offset in range(3 * 4096 + 100, len(data), BLOCK):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(20_000)


def _not_duckdb(path):
    path.write_bytes(b"this is not a DuckDB file\n" * 100)


@pytest.mark.parametrize("damage", [_flip_every_block, _truncate, _not_duckdb], ids=["flipped", "truncated", "not-duckdb"])
def test_a_catalog_that_does_not_open_is_rebuilt_with_one_line(ip, store_dir, capsys, damage):
    store = _store_with_history(store_dir)
    before = {name: store.versions(name) for name in ("m", "n")}
    damage(store_dir / "catalog.duckdb")
    capsys.readouterr()
    listing = ip.run_line_magic("nbc", "list")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("nbcustom: catalog.duckdb: broken catalog: does not open ("), err[0]
    assert "moved it aside as catalog.duckdb.broken-" in err[0] and "rebuilt it from the version folders: 2 models, 5 versions;" in err[0]
    assert err[0].endswith(("lost: 1 jobs, 1 runs that made no version", "(the broken file cannot be read to count them)")), err[0]
    assert len(list(store_dir.glob("catalog.duckdb.broken-*"))) == 1
    assert dict(zip(listing["name"], listing["active"])) == {"m": 1, "n": 2}
    for name, rows in before.items():
        after = store.versions(name)
        assert [(r["version"], r["kind"], r["active"], r["rows_trained"], r["metrics"], r["promotion"]) for r in after] == \
            [(r["version"], r["kind"], r["active"], r["rows_trained"], r["metrics"], r["promotion"]) for r in rows]
        for row in after:
            store.get(name, row["version"])
    assert [(r["id"], r["version"], r["rows_read"]) for r in store.runs("n")] == [("run-n-2", 2, 7)]
    assert store.check() == []
    ip.run_line_magic("nbc", "list")
    assert capsys.readouterr().err == ""  # said once


def _hold_read_only(path):
    """Another process holding a read-only DuckDB connection: DuckDB then refuses a
    read-write open of the file by anyone else, so a read that opened it read-write fails."""
    code = f"import duckdb, sys; con = duckdb.connect({str(path)!r}, read_only=True); print('held', flush=True); sys.stdin.read()"
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "held\n"
    return holder


def test_reads_open_the_catalog_read_only_and_change_nothing(store_dir):
    store = Store(store_dir)
    save(store, "m")
    save(store, "m")
    catalog = store_dir / "catalog.duckdb"
    before = (catalog.read_bytes(), catalog.stat().st_mtime_ns, sorted(p.name for p in store_dir.iterdir()))
    holder = _hold_read_only(catalog)
    try:
        time.sleep(0.05)  # an mtime changed by the reads would differ by more than the clock's step
        assert [m["name"] for m in store.models()] == ["m"]
        assert [r["version"] for r in store.versions("m")] == [1, 2]
        assert store.get("m").version == 2 and store.runs() == [] and store.jobs() == []
        assert store.check() == []
        with pytest.raises(Exception, match="open in another program"):
            store.activate("m", 1)  # proof that the holder blocks read-write opens
    finally:
        holder.communicate("")
    assert (catalog.read_bytes(), catalog.stat().st_mtime_ns, sorted(p.name for p in store_dir.iterdir())) == before


def test_an_older_catalog_is_read_without_upgrading_the_file(store_dir):
    store_dir.mkdir()
    con = duckdb.connect(str(store_dir / "catalog.duckdb"))
    con.execute("""
        CREATE TABLE models (name VARCHAR PRIMARY KEY, kind VARCHAR, active INTEGER, created TIMESTAMP, updated TIMESTAMP);
        CREATE TABLE versions (name VARCHAR, version INTEGER, kind VARCHAR, status VARCHAR, created TIMESTAMP,
            rows_trained BIGINT, metrics JSON, PRIMARY KEY (name, version));
        INSERT INTO models VALUES ('m', 'automl', 1, now(), now());
        INSERT INTO versions VALUES ('m', 1, 'automl', 'ready', now(), 10, '{}');""")
    con.close()
    data = (store_dir / "catalog.duckdb").read_bytes()
    store = Store(store_dir)
    assert store.versions("m")[0]["promotion"] is None and store.jobs() == [] and store.runs() == []
    assert (store_dir / "catalog.duckdb").read_bytes() == data


def test_a_read_only_store_lists_and_loads(store_dir):
    store = Store(store_dir)
    save(store, "m")
    catalog = store_dir / "catalog.duckdb"
    catalog.chmod(0o444)
    store_dir.chmod(0o555)  # stops writes for a user, not for root: the test above covers root
    try:
        data = catalog.read_bytes()
        assert [m["name"] for m in Store(store_dir).models()] == ["m"]
        assert Store(store_dir).get("m").model_dir.joinpath("weights.bin").read_bytes() == b"weights"
        out = subprocess.run([sys.executable, "-m", "nbcustom.cli", "--store", str(store_dir), "show", "m"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.startswith("m@1"), out.stderr
        assert catalog.read_bytes() == data
    finally:
        store_dir.chmod(stat.S_IRWXU)
        catalog.chmod(0o644)


@contextlib.contextmanager
def _immutable(*paths):
    """``chattr +i``: no one, root included, may change these files (in a folder: add, remove
    or rename an entry). Tests run as root here, for whom permission bits stop nothing."""
    names = [str(p) for p in paths]
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", *names], capture_output=True).returncode != 0:
        subprocess.run(["chattr", "-i", *names], capture_output=True)
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *names], check=True)


def test_a_store_no_one_may_write_lists_and_loads_and_refuses_changes(store_dir):
    store = Store(store_dir)
    save(store, "m")
    save(store, "m")
    with _immutable(store_dir, store_dir / "catalog.duckdb"):
        assert [m["name"] for m in store.models()] == ["m"] and store.get("m", 1).version == 1
        assert store.check() == []
        for change in (lambda: store.activate("m", 1), lambda: save(store, "m"), lambda: store.check(repair=True)):
            with pytest.raises(ReadOnlyStore, match="is read-only for you"):
                change()
    assert store.active_version("m") == 2 and not (store_dir / ".staging").exists()


def test_a_broken_catalog_in_a_store_no_one_may_write_is_read_from_the_folders(store_dir, capsys):
    store = _store_with_history(store_dir)
    _flip_every_block(store_dir / "catalog.duckdb")
    data = (store_dir / "catalog.duckdb").read_bytes()
    with _immutable(store_dir, store_dir / "catalog.duckdb"):
        capsys.readouterr()
        assert {m["name"]: m["active"] for m in store.models()} == {"m": 1, "n": 2}
        assert store.get("n").model_dir.joinpath("index.bin").read_bytes() == b"index"
        assert [r["version"] for r in store.versions("m")] == [1, 2, 3]
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "does not open and the store is read-only for you: read 2 models, 5 versions" in err[0], err
        assert [f.problem for f in store.check()] == ["broken catalog"]
    assert (store_dir / "catalog.duckdb").read_bytes() == data and not list(store_dir.glob("*.broken-*"))


_KERNEL = """
import sys, duckdb, nbcustom
con = duckdb.connect(sys.argv[2], read_only=True)
for i in range(20):
    nbcustom.rag("docs", "SELECT * FROM docs", con=con, store=sys.argv[1], ui="none")
"""
# the reader reads every version it sees, then lets the writers have the cores for a moment (a
# reader in a busy loop took one of the two cores from the rest of the suite)
_READER = """
import os, sys, time
from nbcustom.store import Store
store, reads = Store(sys.argv[1]), 0
while not os.path.exists(sys.argv[2]):
    for model in store.models():
        for row in store.versions(model["name"]):
            store.get(model["name"], row["version"])  # checksums verified
            reads += 1
    time.sleep(0.2)
print(reads)
"""


@pytest.mark.slow
def test_two_kernels_and_the_cron_command_commit_while_a_reader_reads(store_dir, tmp_path):
    """Issue 27.5: two processes committing through the API as kernels do and ``nbcustom
    jobs run`` (cron) running a job 20 times, all on one RAG index, while a reader loads
    every version it sees: distinct numbers, valid checksums, no error."""
    import duckdb
    import nbcustom
    from nbcustom import jobs

    database = str(tmp_path / "shop.duckdb")
    with duckdb.connect(database) as con:
        con.execute("CREATE TABLE docs AS SELECT * FROM (VALUES (1, 'The office opens at 8.'), (2, 'Lunch is at noon.')) t(id, text)")
    with duckdb.connect(database, read_only=True) as con:
        nbcustom.rag("docs", "SELECT * FROM docs", con=con, store=store_dir, ui="none")
    jobs.schedule(Store(store_dir), "docs", "1d", database=database, cron=True)
    env = {**os.environ, "NBCUSTOM_WORKER": "off", "NBCUSTOM_STORE": str(store_dir)}
    done = tmp_path / "done"
    start = lambda args: subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    reader = start(["-c", _READER, str(store_dir), str(done)])
    writers = [start(["-c", _KERNEL, str(store_dir), database]) for _ in range(2)]
    writers.append(start(["-m", "nbcustom.cli", "jobs", "run", *["docs"] * 20]))
    outputs = [writer.communicate(timeout=600) for writer in writers]
    done.touch()
    reads, err = reader.communicate(timeout=120)
    for writer, (out, err_) in zip(writers, outputs):
        assert writer.returncode == 0, err_
        assert not [line for line in err_.splitlines() if line.strip() and not line.startswith("nbcustom: waiting for the store")], err_
    assert reader.returncode == 0, err
    assert int(reads) > 0  # the reader read versions while they were being written
    cron = outputs[2][0].splitlines()
    assert len(cron) == 20 and all(line.startswith("docs: ok -> v") for line in cron), cron
    store = Store(store_dir)
    assert [r["version"] for r in store.versions("docs")] == list(range(1, 62))
    assert store.check() == []  # every checksum valid, nothing left over


def test_a_writer_that_waits_for_the_store_says_so_in_one_line(store_dir):
    store = Store(store_dir)
    save(store, "m")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(store_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "holding"
    waiter = subprocess.run([sys.executable, "-c", _SAVER, str(store_dir)], capture_output=True, text=True, timeout=60)
    holder.wait(30)
    assert waiter.returncode == 0, waiter.stderr
    lines = waiter.stderr.strip().splitlines()
    assert lines == [f"nbcustom: waiting for the store {store_dir}: process {holder.pid} (-c) is writing it"], lines
    assert [r["version"] for r in store.versions("m")] == [1, 2]


_HOLDER = """
import sys, time
from nbcustom.store import Store
with Store(sys.argv[1])._locked():
    print("holding", flush=True)
    time.sleep(2.5)
"""
_SAVER = """
import sys
from nbcustom.store import Store
with Store(sys.argv[1]).build("m", "automl") as build:
    (build.model_dir / "weights.bin").write_bytes(b"w")
"""


def test_a_store_no_one_may_write_predicts(store_dir, tmp_path):
    """A read-only user of the store predicts: a real (small) LLM version, its store immutable."""
    import llm_task
    import nbcustom

    base = llm_task.tiny_base(tmp_path / "tiny")
    rows = llm_task.rows(12)
    nbcustom.finetune("fmt", rows, store=store_dir, base=str(base), max_steps=1, eval_frac=0.25, max_new_tokens=2, ui="none")
    folders = [store_dir, store_dir / "catalog.duckdb", store_dir / "fmt", store_dir / "fmt" / "v1"]
    with _immutable(*folders):
        predicted = nbcustom.predict("fmt", rows[["prompt"]].head(2), store=store_dir, ui="none", max_new_tokens=2)
    assert len(predicted) == 2 and predicted["prediction"].map(type).eq(str).all()
