"""Scheduled jobs: new rows only, nothing-new runs, recorded failures, a responsive kernel, CLI."""

import json
import os
import subprocess
import sys
import threading
import time

import duckdb
import pytest

from nbcustom import jobs
from nbcustom.store import Store
from notebooks import run_notebook

pytestmark = pytest.mark.slow

SALES = """CREATE OR REPLACE TABLE {table} AS
SELECT range AS id, (range % 7)::INT AS rooms, (range * 37 % 100)::DOUBLE AS area,
       30 * (range % 7) + 2 * (range * 37 % 100) AS price FROM range({n})"""


def wait_for(condition, timeout=180, step=0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("timed out waiting")


def job_runs(store):
    return [r for r in reversed(store.runs("prices", limit=100)) if r["magic"] == "job"]


def retrain_with_job(ip, store_dir, table: str, n: int):
    """Version 1 of `prices` from a fresh table, then a job every second tracking `id`."""
    con = duckdb.default_connection()
    con.execute(SALES.format(table=table, n=n))
    ip.run_cell(f"%%retrain prices --target price --time-limit 5\nSELECT * FROM {table}")
    ip.run_line_magic("nbc", "job prices --every 1s --track id")
    return con, Store(store_dir)


def test_job_retrains_on_new_rows_only_and_skips_when_nothing_is_new(ip, store_dir):
    con, store = retrain_with_job(ip, store_dir, "job_sales", 120)
    try:
        first = wait_for(lambda: job_runs(store))
        assert first[0]["status"] == "nothing new" and first[0]["version"] is None
        assert [r["version"] for r in store.versions("prices")] == [1]
        con.execute("INSERT INTO job_sales SELECT 1000 + range, 2, 40, 140 FROM range(15)")
        made = wait_for(lambda: [r for r in job_runs(store) if r["status"] == "ok"])[0]
        assert made["version"] == 2 and made["rows_read"] == 15
        manifest = store.get("prices", 2).manifest
        assert manifest["counts"]["previous"] == 120 and manifest["counts"]["new"] == 15 and manifest["counts"]["rows"] == 135
        assert manifest["metrics"]["after"]["root_mean_squared_error"] > 0  # errors on their natural scale
        after = len(job_runs(store))
        wait_for(lambda: len(job_runs(store)) > after)
        assert job_runs(store)[-1]["status"] == "nothing new"
        assert [r["version"] for r in store.versions("prices")] == [1, 2]
        table = ip.run_line_magic("nbc", "jobs")
        assert table.loc[0, "name"] == "prices" and table.loc[0, "last_value"] == 1014
    finally:
        ip.run_line_magic("nbc", "job prices --stop")
    assert Store(store_dir).jobs()[0]["status"] == "stopped"
    # with no active job left the kernel's job thread ends (no thread alive at interpreter exit)
    wait_for(lambda: not [t for t in threading.enumerate() if t.name.startswith("nbcustom-jobs")], timeout=30)


def test_failed_run_is_recorded_and_the_next_still_happens(ip, store_dir):
    con, store = retrain_with_job(ip, store_dir, "fragile_sales", 100)
    try:
        con.execute("DROP TABLE fragile_sales")
        runs = wait_for(lambda: (lambda r: r if len(r) >= 2 else None)(job_runs(store)))
        assert [r["status"] for r in runs[:2]] == ["error", "error"]
        assert "fragile_sales" in runs[0]["error"]
    finally:
        ip.run_line_magic("nbc", "job prices --stop")


def test_cli_runs_due_jobs(tmp_path):
    database, store_dir = tmp_path / "shop.duckdb", tmp_path / "store"
    con = duckdb.connect(str(database))
    con.execute(SALES.format(table="sales", n=100))
    import nbcustom

    nbcustom.retrain("prices", "SELECT * FROM sales", con=con, store=store_dir, ui="none", target="price", time_limit=5)
    store = Store(store_dir)
    jobs.schedule(store, "prices", "1s", track="id", database=str(database), con=con)
    con.execute("INSERT INTO sales SELECT 500 + range, 1, 10, 50 FROM range(12)")
    con.close()
    time.sleep(1.2)
    env = {**os.environ, "NBCUSTOM_STORE": str(store_dir)}
    out = subprocess.run([sys.executable, "-m", "nbcustom.cli", "jobs", "run"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("prices: ok -> v2")  # then " (not promoted: ...)" if v2 scored worse than v1
    assert job_runs(store)[-1]["rows_read"] == 12
    time.sleep(1.2)
    out = subprocess.run([sys.executable, "-m", "nbcustom.cli", "jobs", "run"], capture_output=True, text=True, env=env)
    assert out.stdout.strip() == "prices: nothing new"
    assert [r["version"] for r in store.versions("prices")] == [1, 2]


def test_notebook_stays_responsive_and_clean_while_a_job_trains(tmp_path):
    cells = [
        "%load_ext nbcustom",
        "import duckdb, time, fcntl\n" + "duckdb.sql('''" + SALES.format(table="sales", n=150) + "''')",
        "%%retrain prices --target price --time-limit 8\nSELECT * FROM sales",
        "%nbc job prices --every 1s --track id",
        # wait until the job holds its lock, i.e. it is training on the new rows
        "duckdb.sql('INSERT INTO sales SELECT 900 + range, 4, 60, 240 FROM range(20)')\n"
        "lock = open(%r, 'a+')\n" % str(tmp_path / "store" / ".jobs" / "prices.lock")
        + "for _ in range(600):\n"
        "    try:\n        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.flock(lock, fcntl.LOCK_UN); time.sleep(0.05)\n"
        "    except BlockingIOError:\n        break",
        "t = time.perf_counter(); answer = sum(range(1000)); quick = time.perf_counter() - t\nprint('quick cell', answer)",
        "busy = True\ntry:\n    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB); fcntl.flock(lock, fcntl.LOCK_UN); busy = False\n"
        "except BlockingIOError:\n    pass\nprint('job still training:', busy)",
        "import nbcustom\nfor _ in range(600):\n    if len(nbcustom.Store(%r).versions('prices')) == 2:\n        break\n    time.sleep(0.5)\n" % str(tmp_path / "store")
        + "%nbc job prices --stop",
    ]
    nb = run_notebook(cells, tmp_path / "store", ui="static")
    quick, check = nb.cells[5], nb.cells[6]
    assert [o.get("text") for o in quick.outputs] == ["quick cell 499500\n"]
    assert check.outputs[0]["text"] == "job still training: True\n"
    timing = quick.metadata["execution"]
    took = _seconds(timing["shell.execute_reply"]) - _seconds(timing["iopub.execute_input"])
    assert took < 2.0
    for cell in nb.cells[4:]:  # nothing from the job leaks into cells run meanwhile
        text = json.dumps(cell.outputs)
        assert "AutoGluon" not in text and "%%retrain" not in text and "Fitting" not in text
    assert len(Store(tmp_path / "store").versions("prices")) == 2


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
