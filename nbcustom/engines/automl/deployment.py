"""AutoML export: AutoGluon's predict-only copy of a version's predictor (``deployment``),
loadable with ``TabularPredictor.load`` / ``TimeSeriesPredictor.load``.

Tabular: ``clone_for_deployment`` keeps only the models the best one needs and drops what
only training uses. With ``--refit`` the models are first refit on all rows
(``refit_full``), in a scratch clone: refitting writes into the predictor's folder, and the
store's copy must stay as it was committed. AutoGluon has no predict-only clone for time
series, so a time-series export is a copy of the predictor (refit first with ``--refit``),
with the version's rows, its covariates' roles and an example that forecasts from them.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .common import quiet
from .tabular import PREDICTOR


def export(version, folder: Path, spec) -> list[str]:
    source = version.model_dir / PREDICTOR
    task = version.manifest.get("task", "tabular")
    scratch = Path(tempfile.mkdtemp(prefix=".nbcustom-refit-", dir=folder.parent))
    try:
        with quiet():
            if task == "timeseries":
                from autogluon.timeseries import TimeSeriesPredictor

                predictor = TimeSeriesPredictor.load(str(source))
                if spec.refit:
                    shutil.copytree(source, scratch, dirs_exist_ok=True)
                    predictor = TimeSeriesPredictor.load(str(scratch))
                    predictor.refit_full()
                shutil.copytree(predictor.path, folder, dirs_exist_ok=True)
                model = predictor.model_best
                _forecast_example(version, folder)
            else:
                from autogluon.tabular import TabularPredictor

                predictor = TabularPredictor.load(str(source), verbosity=0, require_py_version_match=False)
                if spec.refit:
                    predictor = predictor.clone(path=str(scratch), return_clone=True, dirs_exist_ok=True)
                    predictor.refit_full()
                model = predictor.model_best
                predictor.clone_for_deployment(path=str(folder), dirs_exist_ok=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loader = "TimeSeriesPredictor" if task == "timeseries" else "TabularPredictor"
    stored, exported = size_mib(source), size_mib(folder)
    lines = [
        f"{loader} with {model}" + (" refit on all rows" if spec.refit else ""),
        f"size: {exported:.1f} MiB (the version's predictor: {stored:.1f} MiB)",
        f"load it with {loader}.load({spec.to!r})",
    ]
    if task == "timeseries":
        known = version.manifest["schema"].get("known") or []
        lines.append("predict_example.py forecasts from history.parquet" + (f", given the known covariates {', '.join(known)}" if known else ""))
    return lines


EXAMPLE = '''"""Forecast with the exported predictor, without nbcustom: the history (item_id, timestamp,
the target and the past covariates: {past}) and, for each series, the planned values of
the known covariates ({known}) over the next {horizon} steps. Run it in this folder."""
import json
from pathlib import Path

import pandas as pd
from autogluon.timeseries import TimeSeriesDataFrame, TimeSeriesPredictor

here = Path(__file__).parent
columns = json.loads((here / "covariates.json").read_text())
predictor = TimeSeriesPredictor.load(str(here))
rows = pd.read_parquet(here / "history.parquet")
static = rows.groupby("item_id")[columns["static"]].first().reset_index() if columns["static"] else None
history = TimeSeriesDataFrame.from_data_frame(rows.drop(columns=columns["static"]), static_features_df=static)
known = None
if predictor.known_covariates_names:
    # the plan: here each series keeps its last values; put the planned ones in their place
    known = predictor.make_future_data_frame(history)
    last = rows.groupby("item_id")[predictor.known_covariates_names].last()
    known = TimeSeriesDataFrame(known.join(last, on="item_id"))
print(predictor.predict(history, known_covariates=known))
'''


def _forecast_example(version, folder: Path) -> None:
    """``covariates.json`` (each column's role), ``history.parquet`` (the version's rows in
    AutoGluon's columns) and ``predict_example.py`` that forecasts from them."""
    import json

    from . import covariates, timeseries

    schema = version.manifest["schema"]
    roles = covariates.Roles.of(schema)
    target, stamp, item = schema["target"], schema["timestamp"], schema.get("item_id")
    rows = timeseries._clean(timeseries.previous_rows(version), target, stamp, item, roles.columns)
    timeseries._renamed(rows, stamp, item).to_parquet(folder / "history.parquet", index=False)
    (folder / "covariates.json").write_text(json.dumps({"target": target, **roles.schema()}, indent=1) + "\n")
    text = EXAMPLE.format(past=", ".join(roles.past) or "none", known=", ".join(roles.known) or "none", horizon=schema["horizon"])
    (folder / "predict_example.py").write_text(text)


def size_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20
