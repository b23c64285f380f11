"""%%retrain, the AutoML %%finetune update and %%predict, with real AutoGluon on small
datasets that scikit-learn and statsmodels ship (no download)."""

from __future__ import annotations

import shutil
import time

import pandas as pd
import pytest

import nbcustom
from nbcustom.engines.automl.common import accumulate, in_holdout
from nbcustom.errors import NbCustomError
from nbcustom.store import Store

from conftest import snapshot

# AutoGluon's time-limited fits, and a finetune timed against a retrain: alone, after the rest (`make test`)
pytestmark = pytest.mark.serial

TIME_LIMIT = 12


def cancer_frame() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    frame.insert(0, "id", range(len(frame)))
    frame["diagnosis"] = frame.pop("target").map({0: "malignant", 1: "benign"})
    return frame


def macro_frame() -> pd.DataFrame:
    from statsmodels.datasets import macrodata

    frame = macrodata.load_pandas().data
    frame["quarter_start"] = pd.PeriodIndex.from_fields(year=frame["year"].astype(int), quarter=frame["quarter"].astype(int), freq="Q").to_timestamp()
    return frame[["quarter_start", "realgdp", "realcons"]]


@pytest.fixture(scope="module")
def cancer_store(tmp_path_factory, shell):
    """A store with ``cancer`` v1 (rows with id < 350, from a pandas table in the notebook)
    and v2 (all rows, from a polars table, the cut-off passed as ``{{var}}``)."""
    import polars as pl

    root = tmp_path_factory.mktemp("cancer") / "store"
    shell.run_line_magic("config", f"NbCustom.store = {str(root)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'none'")
    frame = cancer_frame()
    shell.user_ns.update(cancer_df=frame, cancer_pl=pl.from_pandas(frame), first_batch=350)
    started = time.monotonic()
    shell.run_cell_magic("retrain", f"cancer --target diagnosis --time-limit {TIME_LIMIT}", "SELECT * FROM cancer_df WHERE id < {{first_batch}}")
    seconds = time.monotonic() - started
    shell.run_cell_magic("retrain", f"cancer --time-limit {TIME_LIMIT}", "SELECT * FROM cancer_pl")
    for name in ("cancer_df", "cancer_pl", "first_batch"):
        shell.user_ns.pop(name)
    return root, seconds


def copy_store(root, tmp_path):
    target = tmp_path / "store"
    shutil.copytree(root, target)
    return target


# --- rows across versions (no training) -----------------------------------------------
def test_accumulate_drops_duplicates_and_replaces_by_key():
    old = pd.DataFrame({"id": [1, 2, 3], "x": [1.0, 2.0, 3.0], "y": ["a", "b", "c"]})
    new = pd.DataFrame({"id": [3, 2, 4, 4], "x": [3, 20, 4, 40], "y": ["c", "B", "d", "D"]})  # ints: same rows as 3.0
    rows, counts = accumulate(old, new)
    assert counts == {"previous": 3, "new": 4, "duplicates_dropped": 1, "replaced": 0, "rows": 6}
    rows, counts = accumulate(old, new, "id")
    assert counts["duplicates_dropped"] == 1 and counts["replaced"] == 2  # id 2 replaced; first id 4 superseded
    assert rows.sort_values("id")[["id", "y"]].values.tolist() == [[1, "a"], [2, "B"], [3, "c"], [4, "D"]]


def test_holdout_membership_is_a_stable_function_of_each_row():
    frame = cancer_frame()
    mask = in_holdout(frame, 0.2)
    shuffled = frame.sample(frac=1, random_state=1)
    assert (in_holdout(shuffled, 0.2) == mask[shuffled.index]).all()  # order does not matter
    assert (in_holdout(frame.astype({"id": "float64"}), 0.2) == mask).all()  # nor 3 vs 3.0
    assert 0.12 < mask.mean() < 0.28
    by_key = in_holdout(frame.assign(mean_radius=0.0), 0.2, key="id")
    assert (by_key == in_holdout(frame, 0.2, key="id")).all()  # with --key only the key counts


# --- acceptance 1: two-step tabular retrain -------------------------------------------
@pytest.mark.slow
def test_retrain_tabular_trains_v2_on_old_plus_new_rows(cancer_store):
    root, _ = cancer_store
    store = Store(root)
    v1, v2 = store.get("cancer", 1), store.get("cancer", 2)
    c1, c2 = v1.manifest["counts"], v2.manifest["counts"]
    assert c1["rows"] == c1["trained"] + c1["held_out"] == 350
    assert (c2["previous"], c2["new"], c2["duplicates_dropped"]) == (350, 569, 350)  # the query re-reads the old rows
    assert c2["rows"] == c2["trained"] + c2["held_out"] == 569
    assert len(pd.read_parquet(v2.path / "train.parquet")) == 569
    assert store.active_version("cancer") == 2
    assert v2.manifest["task"] == "tabular" and v2.manifest["target"] == "diagnosis"
    assert v2.manifest["options"]["target"] == "diagnosis"  # inherited, not given the second time

    before, after = v2.manifest["metrics"]["before"], v2.manifest["metrics"]["after"]
    assert set(before) == set(after) >= {"accuracy", "balanced_accuracy", "roc_auc"}
    # "before" really is v1 scored on v2's holdout: recompute it
    rows = pd.read_parquet(v2.path / "train.parquet")
    holdout = rows[in_holdout(rows, v2.manifest["options"]["eval_frac"])]
    assert len(holdout) == c2["held_out"]
    v1_pred = nbcustom.load("cancer", 1, store=root).predict(holdout)
    assert before["accuracy"] == pytest.approx((v1_pred["prediction"] == holdout["diagnosis"].to_numpy()).mean(), abs=1e-6)
    # v1's holdout rows are still held out in v2
    rows1 = pd.read_parquet(v1.path / "train.parquet")
    assert set(rows1[in_holdout(rows1, 0.2)]["id"]) <= set(holdout["id"])
    assert "majority class" in v1.manifest["baseline"] and "baseline" not in v2.manifest
    assert v1.manifest["metrics"]["before"]["accuracy"] < v1.manifest["metrics"]["after"]["accuracy"]
    assert (v2.path / "feature_importance.png").exists() and (v2.path / "eval.parquet").exists()
    assert v2.manifest["feature_importance"]


@pytest.mark.slow
def test_predict_appends_prediction_and_class_probabilities(cancer_store, ip):
    root, _ = cancer_store
    ip.run_line_magic("config", f"NbCustom.store = {str(root)!r}")
    ip.user_ns["cancer_df"] = cancer_frame()
    out = ip.run_cell_magic("predict", "cancer --into cancer_scored", "SELECT * EXCLUDE (diagnosis) FROM cancer_df LIMIT 7")
    assert len(out) == 7 and {"prediction", "proba_benign", "proba_malignant"} <= set(out.columns)
    assert set(out["prediction"]) <= {"benign", "malignant"}
    assert (out[["proba_benign", "proba_malignant"]].sum(axis=1) - 1).abs().max() < 1e-6
    assert nbcustom.connection().execute("SELECT count(*) FROM cancer_scored").fetchone()[0] == 7


# --- acceptance 3: the AutoML finetune update ---------------------------------------
@pytest.mark.slow
def test_finetune_reuses_the_best_model_and_is_much_cheaper(cancer_store, tmp_path):
    root, retrain_seconds = cancer_store
    root = copy_store(root, tmp_path)
    new_rows = cancer_frame().iloc[::2]  # ~ the size of v1's 350 rows
    started = time.monotonic()
    v3 = nbcustom.finetune("cancer", new_rows, store=root, ui="none")
    finetune_seconds = time.monotonic() - started
    assert finetune_seconds < 0.6 * retrain_seconds, (finetune_seconds, retrain_seconds)

    reused = v3.manifest["reused"]
    assert reused["from_version"] == 2 and reused["model_type"] in {"GBM", "RF", "XT", "KNN", "CAT", "XGB", "NN_TORCH", "LR", "FASTAI"}
    assert reused["hyperparameters"] and not reused["model"].startswith("WeightedEnsemble")
    assert reused["model"] in nbcustom.load("cancer", 2, store=root).predictor.model_names()
    predictor = nbcustom.load("cancer", store=root).predictor
    assert len(predictor.model_names()) == 1  # one model, no search, no ensemble
    assert v3.manifest["counts"]["trained"] + v3.manifest["counts"]["held_out"] == len(new_rows)
    assert set(v3.manifest["metrics"]["before"]) == set(v3.manifest["metrics"]["after"])
    assert v3.manifest["magic"] == "finetune" and Store(root).active_version("cancer") == 3


# --- acceptance 2: two-step time series retrain ---------------------------------------
@pytest.mark.slow
def test_key_is_no_feature_and_predict_does_not_need_it(ip, store_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    houses = pd.DataFrame({"house_id": range(240), "rooms": rng.integers(1, 6, 240), "area": rng.normal(80, 20, 240)})
    # a price that grows with the id too: a model given the key would use it
    houses["price"] = 50 * houses.rooms + 2 * houses.area + houses.house_id + rng.normal(0, 10, 240)
    ip.user_ns["houses"] = houses
    ip.run_cell_magic("retrain", f"h --target price --key house_id --time-limit {TIME_LIMIT}", "SELECT * FROM houses WHERE house_id < 200")
    ip.run_cell_magic("finetune", "h", "SELECT * FROM houses WHERE house_id >= 120")  # the update keeps the key out too
    for version in (1, 2):
        model = nbcustom.load("h", version, store=store_dir)
        assert set(model.predictor.original_features) == {"rooms", "area"}
        assert "house_id" not in Store(store_dir).get("h", version).manifest["feature_importance"]
    result = ip.run_cell_magic("predict", "h", "SELECT rooms, area FROM houses LIMIT 5")
    assert list(result.columns) == ["rooms", "area", "prediction"] and result["prediction"].notna().all()


@pytest.mark.slow
def test_retrain_timeseries_two_series_and_forecast(ip, store_dir):
    ip.user_ns["macro"] = macro_frame()
    sql = """SELECT quarter_start, series, value FROM (UNPIVOT macro ON realgdp, realcons INTO NAME series VALUE value)
             WHERE quarter_start < {{cutoff}}"""
    ip.user_ns["cutoff"] = pd.Timestamp("1995-01-01")
    ip.run_cell_magic("retrain", "gdp --target value --timestamp quarter_start --item-id series --horizon 4 --time-limit 25", sql)
    ip.user_ns["cutoff"] = pd.Timestamp("2100-01-01")
    ip.run_cell_magic("retrain", "gdp --time-limit 25", sql)

    store = Store(store_dir)
    v1, v2 = store.get("gdp", 1), store.get("gdp", 2)
    assert store.active_version("gdp") == 2
    assert v1.manifest["counts"]["rows"] == 2 * 144
    c2 = v2.manifest["counts"]
    assert (c2["previous"], c2["rows"], c2["held_out"], c2["series"]) == (288, 2 * 203, 2 * 4, 2)
    assert c2["duplicates_dropped"] == 288
    before, after = v2.manifest["metrics"]["before"], v2.manifest["metrics"]["after"]
    assert set(before) == set(after) >= {"MASE", "WQL", "RMSE"}
    assert all(value >= 0 for value in [*before.values(), *after.values()])
    assert (v1.path / "forecast.png").exists() and (v2.path / "forecast.png").exists()
    assert v1.manifest["task"] == "timeseries" and "seasonal naive" in v1.manifest["baseline"]
    assert all("left out" in line for line in v2.manifest.get("skipped_models", []))

    out = ip.run_cell_magic("predict", "gdp", "SELECT quarter_start, series, value FROM (UNPIVOT macro ON realgdp, realcons INTO NAME series VALUE value)")
    assert len(out) == 2 * 4 and {"series", "timestamp", "prediction", "p10", "p90"} <= set(out.columns)
    assert (out["timestamp"] > pd.Timestamp("2009-07-01")).all()
    assert (out["p10"] <= out["prediction"]).all() and (out["prediction"] <= out["p90"]).all()


# --- acceptance 4: bad input is one line and changes nothing ---------------------------
@pytest.mark.parametrize(
    "line, sql, message",
    [
        ("cancer", "SELECT * FROM cancer_df", "--target COL is required"),
        ("fresh --target nope", "SELECT * FROM cancer_df", "--target nope: no such column"),
        ("fresh --target diagnosis --metric rmse", "SELECT * FROM cancer_df", "--metric rmse is for a numeric target"),
        ("fresh --target diagnosis", "SELECT * FROM cancer_df WHERE id % 50 = 0", "the holdout needs at least"),
        ("fresh --target value --timestamp day", "SELECT DATE '2026-01-01' + (i % 30)::INT AS day, i::DOUBLE AS value FROM range(60) t(i)", "rows share a timestamp"),
        ("fresh --target value --timestamp day --horizon 10", "SELECT DATE '2026-01-01' + i::INT AS day, i::DOUBLE AS value FROM range(20) t(i)", "with --horizon 10 each series needs at least 31"),
        ("fresh --target label --timestamp day", "SELECT DATE '2026-01-01' + i::INT AS day, 'x' || i AS label FROM range(40) t(i)", "must be numeric to forecast"),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_the_store_unchanged(ip, store_dir, tmp_path, line, sql, message):
    store = store_dir
    ip.user_ns["cancer_df"] = cancer_frame()
    state = snapshot(store)
    with pytest.raises(NbCustomError) as error:
        ip.run_cell_magic("retrain", line, sql)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert snapshot(store) == state


@pytest.mark.slow
def test_bad_input_against_an_existing_model_leaves_its_versions_alone(cancer_store, ip, tmp_path):
    root = copy_store(cancer_store[0], tmp_path)
    ip.run_line_magic("config", f"NbCustom.store = {str(root)!r}")
    ip.user_ns["cancer_df"] = cancer_frame()
    state = snapshot(root)
    for line, sql in [
        ("cancer --target mean_radius", "SELECT * FROM cancer_df"),  # a different target
        ("cancer --timestamp id", "SELECT * FROM cancer_df"),  # tabular -> time series
        ("cancer --key nope", "SELECT * FROM cancer_df"),
    ]:
        with pytest.raises(NbCustomError) as error:
            ip.run_cell_magic("retrain", line, sql)
        assert "\n" not in str(error.value)
    with pytest.raises(NbCustomError, match="held out"):
        nbcustom.finetune("cancer", cancer_frame().head(20), store=root, ui="none")
    assert snapshot(root) == state


def test_load_ext_does_not_import_autogluon():
    import subprocess
    import sys

    code = "import sys, nbcustom; from IPython.testing.globalipapp import start_ipython; ip = start_ipython(); ip.run_line_magic('load_ext', 'nbcustom'); print(any(m.startswith('autogluon') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
