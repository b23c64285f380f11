"""Forecasts that know what is planned (issue 31): ``--known`` covariates, past covariates
and static features on weekly store sales with promotions (tests/sales_task.py), against
the same model without the plan and against AutoGluon used directly; ``%%predict`` over
planned rows; the export's example."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import nbcustom
from nbcustom.errors import NbCustomError
from nbcustom.store import Store

import sales_task
from conftest import snapshot

# AutoGluon's time-limited fits compared with each other: alone, after the rest (`make test`)
pytestmark = pytest.mark.serial

HORIZON, TIME_LIMIT, PRESETS = 8, 60, "medium_quality"
SHAPE = dict(target="units", timestamp="week", item_id="store", horizon=HORIZON, time_limit=TIME_LIMIT, presets=PRESETS, ui="none")


@pytest.fixture(scope="module")
def sales(tmp_path_factory):
    """``with`` (promo and price known ahead) and ``without`` (the same rows, no plan) on 20
    stores over three years."""
    store = tmp_path_factory.mktemp("sales") / "store"
    rows = sales_task.rows()
    nbcustom.retrain("with", rows, store=store, known="promo,price", **SHAPE)
    nbcustom.retrain("without", rows, store=store, **SHAPE)
    return store, rows


def direct_mase(rows) -> float:
    """AutoGluon used directly: the same holdout, known covariates, presets and time limit
    (on a machine busy with other work, the time limit cuts models short and both figures
    move: tests/benchmarks/RESULTS.md)."""
    import tempfile

    from autogluon.timeseries import TimeSeriesDataFrame, TimeSeriesPredictor

    from nbcustom.engines.automl.common import quiet

    frame = rows.rename(columns={"store": "item_id", "week": "timestamp"})
    static = frame.groupby("item_id")[["size"]].first().reset_index()
    data = TimeSeriesDataFrame.from_data_frame(frame.drop(columns="size"), static_features_df=static)
    with tempfile.TemporaryDirectory() as folder, quiet():  # the pretrained models' offline tracebacks
        predictor = TimeSeriesPredictor(target="units", prediction_length=HORIZON, known_covariates_names=["promo", "price"], path=folder, verbosity=0)
        predictor.fit(data.slice_by_timestep(None, -HORIZON), presets=PRESETS, time_limit=TIME_LIMIT, random_seed=0)
        return -predictor.evaluate(data, metrics=["MASE"])["MASE"]


@pytest.mark.slow
def test_known_covariates_lower_the_holdout_error_as_autogluon_directly(sales, capsys):
    store, rows = sales
    with_, without = Store(store).get("with"), Store(store).get("without")
    mase_with, mase_without = with_.manifest["metrics"]["after"]["MASE"], without.manifest["metrics"]["after"]["MASE"]
    direct = direct_mase(rows)
    with capsys.disabled():
        print(f"\nholdout MASE: with --known {mase_with:.4f}, without {mase_without:.4f}, AutoGluon directly {direct:.4f}")
    assert mase_with <= 0.75 * mase_without
    assert abs(mase_with - direct) <= 0.05 * direct

    schema = with_.manifest["schema"]
    assert (schema["known"], schema["past"], schema["static"]) == (["promo", "price"], [], ["size"])
    assert without.manifest["schema"]["past"] == ["promo", "price"]
    used = with_.manifest["covariates_used"]  # the leaderboard's column: every model was tried
    assert used["SeasonalNaive"] == "none" and "known, static" in {used.get("DirectTabular"), used.get("RecursiveTabular")}


@pytest.mark.slow
def test_predict_over_planned_rows_gives_each_row_its_forecast_and_quantiles(sales):
    store, rows = sales
    plan = sales_task.plan(rows, HORIZON)
    out = nbcustom.predict("with", plan, store=store)
    assert len(out) == len(plan) and list(out.columns[:4]) == list(plan.columns)
    assert {"prediction", "p10", "p50", "p90"} <= set(out.columns) and out["prediction"].notna().all()
    assert (out["p10"] <= out["prediction"]).all() and (out["prediction"] <= out["p90"]).all()
    # the plan is seen: a promotion week of a store forecasts more than its other weeks
    lift = out.groupby(["store", "promo"])["prediction"].mean().unstack()
    assert (lift[1] / lift[0]).median() > 1.3  # the data: a promotion lifts a week by half
    # a part of the horizon, for some stores, in any order
    part = plan[plan["store"].isin(["s03", "s07"]) & (plan["week"] <= plan["week"].min() + pd.Timedelta(weeks=2))]
    some = nbcustom.predict("with", part.iloc[::-1], store=store)
    assert len(some) == len(part) and some["prediction"].notna().all()

    # without a plan: the next horizon after the version's rows (%%predict with an empty body)
    ahead = nbcustom.forecast("without", store=store)
    assert len(ahead) == 20 * HORIZON and {"store", "timestamp", "prediction", "p90"} <= set(ahead.columns)
    assert ahead.equals(nbcustom.predict("without", "", store=store))


@pytest.mark.parametrize("change, message", [
    (lambda plan: plan.drop(columns="price"), "lack with's known covariate price"),
    (lambda plan: plan.assign(promo=None), "known covariate promo is NULL in 160 rows"),
    (lambda plan: plan.assign(week=plan["week"] + pd.Timedelta(weeks=HORIZON)), "is not one of the next 8 steps"),
    (lambda plan: plan.assign(store="s99"), "store 's99': not among the series"),
])
@pytest.mark.slow
def test_a_bad_plan_is_one_line(sales, change, message):
    store, rows = sales
    before = snapshot(store)
    with pytest.raises(NbCustomError, match=message) as error:
        nbcustom.predict("with", change(sales_task.plan(rows, HORIZON)), store=store)
    assert "\n" not in str(error.value) and snapshot(store) == before


@pytest.mark.slow
def test_a_model_with_known_covariates_asks_for_the_plan(sales):
    store, rows = sales
    for call in (lambda: nbcustom.forecast("with", store=store), lambda: nbcustom.predict("with", rows, store=store)):
        with pytest.raises(NbCustomError, match=r"forecasts with known covariates \(promo, price\): %%predict it over the planned rows of the next 8 steps"):
            call()


@pytest.mark.slow
def test_drift_covers_the_covariates(sales):
    store, rows = sales
    later = sales_task.rows(seed=5)
    later["week"] = later["week"] + pd.Timedelta(weeks=156)
    later["promo"] = 1  # every week a promotion from now on
    columns = set(nbcustom.drift("with", later, store=store)["column"])
    assert {"units", "promo", "price"} <= columns


@pytest.mark.slow
def test_the_export_carries_the_covariates_and_its_example_forecasts(sales, tmp_path):
    store, _ = sales
    lines = nbcustom.export("with", store=store, format="deployment", to=str(tmp_path / "deploy"))
    assert any("given the known covariates promo, price" in line for line in lines)
    import json

    assert json.loads((tmp_path / "deploy" / "covariates.json").read_text())["known"] == ["promo", "price"]
    run = subprocess.run([sys.executable, "predict_example.py"], cwd=tmp_path / "deploy", capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "s19" in run.stdout and "0.9" in run.stdout  # every store's forecast with its quantiles


def test_known_without_a_timestamp_or_a_missing_known_column_is_one_line(tmp_path):
    rows = sales_task.rows(stores=2, weeks=30)
    for options, message in (({"known": "promo"}, "--known need --timestamp"), ({**SHAPE, "known": "promo,discount"}, "--known discount: no such column")):
        with pytest.raises(NbCustomError, match=message):
            nbcustom.retrain("x", rows, store=tmp_path / "store", **{"target": "units", "ui": "none", **options})
    assert not (tmp_path / "store").exists() or Store(tmp_path / "store").models() == []


def test_a_later_version_inherits_known():
    from nbcustom.specs import RetrainSpec

    schema = {"target": "units", "timestamp": "week", "item_id": "store", "horizon": 8, "key": None, "known": ["promo", "price"], "past": [], "static": ["size"]}
    spec = RetrainSpec.from_options(time_limit=30).inherit(schema)
    assert (spec.target, spec.known, spec.columns("known")) == ("units", "promo,price", ["promo", "price"])
    assert RetrainSpec.from_options(known="promo").inherit(schema).columns("known") == ["promo"]  # a new choice wins
