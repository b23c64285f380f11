"""Promotion: the --promote decision, and what a version left inactive looks like in the store,
the runs table, %%predict and the summary; jobs' --min-rows and --cron (real AutoGluon,
real DuckDB files, the crontab line run by sh)."""

from __future__ import annotations

import os
import shutil
import subprocess

import duckdb
import numpy as np
import pandas as pd
import pytest

import nbcustom
from nbcustom.display.render import fmt
from nbcustom.engines import Outcome
from nbcustom.engines.automl.common import in_holdout
from nbcustom.errors import NbCustomError
from nbcustom.promotion import decide
from nbcustom.store import Store, Version

TIME_LIMIT = 5


# --- the decision (no training) ----------------------------------------------------------
def outcome(before, after, metric="MASE", higher=False, label="v1"):
    info = {"eval_metric": metric, "higher_is_better": higher}
    return Outcome(before={metric: before}, after={metric: after}, info=info, before_label=label)


def test_decision_follows_the_metric_direction_and_the_policy(tmp_path):
    v1 = Version("co2", 1, tmp_path, {"kind": "automl"})
    worse = decide("if-better", outcome(1.60, 2.26), v1)
    assert (worse.promote, worse.worse, worse.metric, worse.new, worse.old) == (False, True, "MASE", 2.26, 1.60)
    assert worse.reason == "not promoted: MASE 2.26 vs v1's 1.6 on the same holdout (worse, --promote if-better)"
    assert decide("if-better", outcome(1.60, 1.20), v1).promote
    assert decide("if-better", outcome(1.60, 1.60), v1).promote  # a tie is not worse
    # accuracy: higher is better
    assert decide("if-better", outcome(0.9, 0.8, "accuracy", higher=True), v1).worse
    assert not decide("if-better", outcome(0.8, 0.9, "accuracy", higher=True), v1).worse
    always = decide("always", outcome(1.60, 2.26), v1)
    assert always.promote and always.worse
    assert always.line("co2", 2) == "v2 is worse than v1 on the same holdout: MASE 2.26 vs 1.6 — `%nbc activate co2 1` to roll back"
    never = decide("never", outcome(1.60, 1.20), v1)
    assert not never.promote and not never.worse and never.line("co2", 2).startswith("v2 is saved inactive")
    # an LLM: eval_loss, lower is better
    llm = Outcome(before={"eval_loss": 1.2, "token_f1": 0.3}, after={"eval_loss": 1.4, "token_f1": 0.5}, before_label="v1")
    assert decide("if-better", llm, v1).worse
    # a RAG refresh has no holdout metric: always promoted unless --promote never
    rag = Outcome(counts={"added": 3})
    assert decide("if-better", rag, v1).promote and not decide("never", rag, v1).promote
    # a forecast compared with a baseline (another horizon) is not compared with v1
    assert decide("if-better", outcome(1.0, 9.0, label="baseline"), v1).promote
    assert decide("never", outcome(1.0, 9.0), None).promote  # the first version is the only one


def test_bad_promote_option_is_one_line_and_writes_nothing(store_dir):
    with pytest.raises(NbCustomError, match="--promote must be one of always, if-better, never, not 'sometimes'"):
        nbcustom.retrain("m", pd.DataFrame({"x": range(20), "y": range(20)}), store=store_dir, target="y", promote="sometimes")
    assert not store_dir.exists()


# --- a second retrain that is worse by construction -----------------------------------------
def clean(ids) -> pd.DataFrame:
    ids = np.asarray(list(ids))
    x = (ids * 0.6180339887) % 1.0
    return pd.DataFrame({"id": ids, "x": x, "y": 10.0 * x})


def poisoned(ids) -> pd.DataFrame:
    """New rows whose target is corrupted (+40) wherever the row trains, and clean wherever it
    lands in the holdout (membership is a hash of --key id): v2 learns the corruption, v1
    never saw it, and both are scored on clean rows, so v2 is worse whatever models AutoGluon
    picks in its time limit."""
    rows = clean(ids)
    trains = ~in_holdout(rows, 0.2, "id")
    rows.loc[trains, "y"] += 40.0
    return rows


@pytest.fixture(scope="module")
def worse_store(tmp_path_factory):
    """``prices`` v1 on clean rows, and the rows for a v2 that is worse."""
    root = tmp_path_factory.mktemp("promotion") / "store"
    first = clean(range(200))
    nbcustom.retrain("prices", first, store=root, ui="none", target="y", key="id", time_limit=TIME_LIMIT)
    return root, pd.concat([first, poisoned(range(1000, 1300))], ignore_index=True)


@pytest.mark.slow
def test_if_better_keeps_a_worse_version_inactive(ip, store_dir, worse_store):
    shutil.copytree(worse_store[0], store_dir)
    ip.user_ns["sales"] = worse_store[1]
    ip.run_cell_magic("retrain", f"prices --time-limit {TIME_LIMIT} --promote if-better", "SELECT * FROM sales")
    store = Store(store_dir)
    v2 = store.get("prices", 2)
    decision, metrics = v2.manifest["promotion"], v2.manifest["metrics"]
    metric = v2.manifest["eval_metric"]
    assert metric == "root_mean_squared_error" and decision["metric"] == metric
    assert decision["new"] == metrics["after"][metric] > decision["old"] == metrics["before"][metric]
    assert decision["worse"] and not decision["promote"]
    assert store.active_version("prices") == 1
    listing = ip.run_line_magic("nbc", "versions prices")
    row = listing.set_index("version").loc[2]
    assert not row["active"] and row["promotion"].startswith("not promoted: root_mean_squared_error") and "worse" in row["promotion"]
    run = next(r for r in store.runs("prices") if r["version"] == 2)
    assert run["status"] == "ok" and run["promotion"] == row["promotion"]
    # %%predict uses v1, the active version
    ip.user_ns["probe"] = clean(range(5000, 5020))
    predicted = ip.run_cell_magic("predict", "prices", "SELECT * FROM probe")
    by_v1 = nbcustom.load("prices", 1, store=store_dir).predict(clean(range(5000, 5020)))
    by_v2 = nbcustom.load("prices", 2, store=store_dir).predict(clean(range(5000, 5020)))
    assert np.allclose(predicted["prediction"], by_v1["prediction"])
    assert not np.allclose(predicted["prediction"], by_v2["prediction"])
    # the drift of the new rows: the target moved most
    assert v2.manifest["drift"]["columns"][0]["column"] == "y" and v2.manifest["drift"]["new_rows"] == 300
    # the next retrain builds on v2's rows (none is lost) and is compared with v1, the active one
    ip.run_cell_magic("retrain", f"prices --time-limit {TIME_LIMIT} --promote never", "SELECT * FROM probe")
    v3 = store.get("prices", 3)
    assert v3.manifest["counts"]["previous"] == 500 and v3.manifest["promotion"]["against"] == 1
    assert v3.manifest["drift"]["against"] == "v2" and store.active_version("prices") == 1
    # a version left inactive is kept and can be activated
    ip.run_line_magic("nbc", "activate prices 2")
    assert store.active_version("prices") == 2


@pytest.mark.slow
def test_by_default_a_worse_version_is_active_with_one_warning_line(ip, store_dir, worse_store, capsys):
    shutil.copytree(worse_store[0], store_dir)
    ip.user_ns["sales"] = worse_store[1]
    capsys.readouterr()
    ip.run_cell_magic("retrain", f"prices --time-limit {TIME_LIMIT}", "SELECT * FROM sales")
    out = capsys.readouterr().out
    store = Store(store_dir)
    v2 = store.get("prices", 2)
    decision = v2.manifest["promotion"]
    assert store.active_version("prices") == 2 and decision["promote"] and decision["worse"]
    line = (f"v2 is worse than v1 on the same holdout: root_mean_squared_error {fmt(decision['new'])} vs {fmt(decision['old'])}"
            " — `%nbc activate prices 1` to roll back")
    assert [text for text in out.splitlines() if "is worse than" in text] == [line]
    assert "drift of the 300 new rows against v1's rows, PSI by column: y " in out


# --- jobs: --min-rows and --cron ----------------------------------------------------------------
@pytest.mark.slow
def test_cron_job_waits_for_min_rows_then_makes_the_next_version(ip, store_dir, tmp_path, capsys):
    """Acceptance 2 and 4: the printed crontab line, run by sh, makes no version from 30 new
    rows and one from 60, reading a DuckDB file."""
    database = tmp_path / "shop.duckdb"
    con = duckdb.connect(str(database))
    con.register("first", clean(range(200)))
    con.execute("CREATE TABLE sales AS SELECT * FROM first")
    con.close()
    ip.run_line_magic("config", f"NbCustom.database = {str(database)!r}")
    try:
        ip.run_cell_magic("retrain", f"prices --target y --time-limit {TIME_LIMIT}", "SELECT * FROM sales")
        capsys.readouterr()
        ip.run_line_magic("nbc", "job prices --every 10m --track id --min-rows 50 --cron")
    finally:
        ip.run_line_magic("config", "NbCustom.database = ':memory:'")  # the kernel lets go of the file
    printed = capsys.readouterr().out.strip().splitlines()
    line = printed[-1]
    schedule, command = line[: len("*/10 * * * *")], line[len("*/10 * * * *") + 1:]
    assert schedule == "*/10 * * * *" and f"--store {store_dir}" in command and f"--database {database}" in command
    assert " jobs run prices " in command and command.endswith(f">> {store_dir / '.jobs' / 'cron.log'} 2>&1")
    store = Store(store_dir)
    assert store.jobs()[0]["status"] == "cron"  # not run by a kernel thread

    def add(ids):
        con = duckdb.connect(str(database))
        con.register("more", clean(ids))
        con.execute("INSERT INTO sales SELECT * FROM more")
        con.close()

    def cron():
        subprocess.run(["sh", "-c", command], check=True, timeout=300, env={**os.environ})
        return [r for r in store.runs("prices", limit=100) if r["magic"] == "job"][0]

    add(range(2000, 2030))
    run = cron()
    assert run["status"] == "waiting: 30 of 50 new rows" and run["version"] is None and run["rows_read"] == 30
    assert len(store.versions("prices")) == 1
    add(range(2030, 2060))
    run = cron()
    assert run["rows_read"] == 60 and run["version"] == 2 and run["status"] == "ok"
    v2 = store.get("prices", 2)
    assert v2.manifest["counts"]["new"] == 60 and v2.manifest["options"]["promote"] == "if-better"
    assert run["promotion"] == v2.manifest["promotion"]["reason"]
    table = ip.run_line_magic("nbc", "jobs")
    assert table.loc[0, "last_promotion"] == f"v2: {run['promotion']}"
    assert table.loc[0, "largest_drift"].startswith(v2.manifest["drift"]["columns"][0]["column"] + " PSI ")
    assert "prices: ok" in (store_dir / ".jobs" / "cron.log").read_text()


# --- drift without training -------------------------------------------------------------------
def test_nbc_drift_measures_a_query_against_the_training_rows_without_training(ip, store_dir, worse_store):
    from conftest import snapshot

    shutil.copytree(worse_store[0], store_dir)
    before = snapshot(store_dir)
    moved = clean(range(3000, 3200))
    moved["x"] += 2 * moved["x"].std()  # two standard deviations
    moved["y"] = 10.0 * moved["x"]
    moved["colour"] = "red"  # a column v1 never had is not compared
    ip.user_ns["moved"] = moved
    figures = ip.run_line_magic("nbc", "drift prices SELECT * FROM moved")
    assert list(figures["column"][:2]) == ["x", "y"] and figures["psi"].iloc[0] > 0.25
    assert "id" not in set(figures["column"]) and "colour" not in set(figures["column"])
    steady = ip.run_line_magic("nbc", "drift prices@1 SELECT * FROM range(200, 400) t(id), LATERAL (SELECT (id * 0.6180339887) % 1.0 AS x), LATERAL (SELECT 10 * x AS y)")
    assert steady["psi"].max() < 0.1
    with pytest.raises(NbCustomError, match="prices@1 recorded no drift"):
        ip.run_line_magic("nbc", "drift prices")
    assert snapshot(store_dir) == before


@pytest.mark.slow
def test_timeseries_drift_counts_a_new_series_and_never_keeps_v2_inactive(ip, store_dir):
    days = pd.date_range("2026-01-01", periods=120, freq="D")
    rng = np.random.default_rng(0)
    wave = lambda n, level: level + 5 * np.sin(np.arange(n) * 2 * np.pi / 7) + rng.normal(0, 1, n)  # noise: MASE needs it
    old = pd.concat([pd.DataFrame({"shop": s, "day": days[:90], "sold": wave(90, lvl)}) for s, lvl in (("a", 20), ("b", 40))])
    new = pd.concat([pd.DataFrame({"shop": s, "day": days[90:], "sold": wave(30, lvl)}) for s, lvl in (("a", 20), ("b", 40))]
                    + [pd.DataFrame({"shop": "c", "day": days, "sold": wave(120, 200)})])
    ip.user_ns.update(old_sales=old, new_sales=new)
    options = "--target sold --timestamp day --item-id shop --horizon 7 --metric MASE --time-limit 60"  # an upper bound: a loaded machine spends much of it before fitting
    ip.run_cell_magic("retrain", f"shops {options}", "SELECT * FROM old_sales")
    ip.run_cell_magic("retrain", "shops --promote never --metric MASE --time-limit 60", "SELECT * FROM new_sales")
    store = Store(store_dir)
    v2 = store.get("shops", 2)
    assert store.active_version("shops") == 1 and not v2.manifest["promotion"]["promote"]
    decision, metrics = v2.manifest["promotion"], v2.manifest["metrics"]
    assert decision["metric"] == "MASE" and v2.manifest["higher_is_better"] is False
    assert decision["worse"] == (metrics["after"]["MASE"] > metrics["before"]["MASE"])
    drift = {c["column"]: c for c in v2.manifest["drift"]["columns"]}
    assert set(drift) == {"shop", "sold"}  # the timestamp is left out
    assert drift["shop"]["unseen"] == pytest.approx(120 / 180, abs=1e-3)  # series c is new
    assert drift["sold"]["psi"] > 0.25  # c sells ten times more
    assert ip.run_line_magic("nbc", "drift shops@2").equals(nbcustom.drift("shops", version=2, store=store_dir))


def test_an_older_catalog_gains_the_promotion_columns_when_opened(store_dir):
    store_dir.mkdir()
    con = duckdb.connect(str(store_dir / "catalog.duckdb"))
    con.execute("""
        CREATE TABLE models (name VARCHAR PRIMARY KEY, kind VARCHAR, active INTEGER, created TIMESTAMP, updated TIMESTAMP);
        CREATE TABLE versions (name VARCHAR, version INTEGER, kind VARCHAR, status VARCHAR, created TIMESTAMP,
            rows_trained BIGINT, metrics JSON, PRIMARY KEY (name, version));
        CREATE TABLE runs (id VARCHAR PRIMARY KEY, name VARCHAR, magic VARCHAR, started TIMESTAMP, ended TIMESTAMP,
            status VARCHAR, rows_read BIGINT, version INTEGER, error VARCHAR);
        INSERT INTO models VALUES ('m', 'automl', 1, now(), now());
        INSERT INTO versions VALUES ('m', 1, 'automl', 'ready', now(), 10, '{}');""")
    con.close()
    store = Store(store_dir)
    assert store.versions("m")[0]["promotion"] is None
    store.record_run("m", "job", pd.Timestamp.now(), "nothing new")
    assert store.runs("m")[0]["promotion"] is None and store.jobs() == []


def test_cron_schedule_fields():
    from nbcustom.jobs import cron_schedule

    assert [cron_schedule(e) for e in ("1m", "10m", "1h", "6h", "1d", "7d", "2h")] == [
        "* * * * *", "*/10 * * * *", "0 * * * *", "0 */6 * * *", "0 0 * * *", "0 0 */7 * *", "0 */2 * * *"]
    for every in ("30s", "90m", "36h"):
        with pytest.raises(NbCustomError, match="for cron use whole minutes"):
            cron_schedule(every)
