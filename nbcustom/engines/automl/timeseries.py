"""Time-series AutoML: ``TimeSeriesPredictor`` retrain, no-search update, forecasts.

The holdout is the last ``horizon`` steps of every series. Rows are identified by
(item id, timestamp): a new row for a known step replaces the old one.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

from .. import Outcome
from ...errors import NbCustomError
from . import covariates as _cov
from . import drift as _drift
from .common import accumulate, previous_rows, quiet, require_columns, rounded

PREDICTOR = "predictor"
ITEM = "__series__"  # the item id of a single unnamed series
METRICS = ("MASE", "WQL", "RMSE", "MAE")
# pretrained forecasters AutoGluon fetches from the Hugging Face hub: key -> default weights
PRETRAINED = {
    "Chronos": "autogluon/chronos-bolt-small",
    "Chronos2": "autogluon/chronos-2",
    "Toto": "Datadog/Toto-Open-Base-1.0",
    "Toto2": "Datadog/Toto-2.0-22m",
}


# --- %%retrain ------------------------------------------------------------------------
def train(spec, rows, previous, build, display, rows_from=None) -> Outcome:
    display.phase("checking rows")
    target, stamp, item, horizon = spec.target, spec.timestamp, spec.item_id, spec.horizon
    require_columns(rows, {"--target": target, "--timestamp": stamp, "--item-id": item})
    base = rows_from or previous
    old = previous_rows(base)
    if old is not None:
        require_columns(old, {"--item-id": item}, hint=f"; v{base.version} had no such column")
    roles = _cov.roles(rows, target, stamp, item, spec.columns("known"), exclude=[spec.key], old=old)
    new = _clean(rows, target, stamp, item, roles.columns)
    if old is not None:
        old = _clean(old, target, stamp, item, roles.columns)
    data, counts = accumulate(old, new, [c for c in (item, stamp) if c])
    data = data.sort_values([c for c in (item, stamp) if c], kind="stable").reset_index(drop=True)
    _check_lengths(data, item, horizon, minimum=3 * horizon + 1)
    series = _series(data, target, stamp, item, roles.static)
    freq = _frequency(series)
    train_part = series.slice_by_timestep(None, -horizon)
    counts.update(trained=len(train_part), held_out=len(series) - len(train_part), series=series.num_items)
    display.log(f"{len(data)} rows in {series.num_items} series ({counts['previous']} kept + {counts['new']} new, {counts['duplicates_dropped']} duplicates dropped, {counts['replaced']} replaced); last {horizon} steps of each held out")

    hyperparameters, skipped = _hyperparameters(spec.presets)
    for line in skipped:
        display.log(line)
    from autogluon.timeseries import TimeSeriesPredictor

    display.phase("training")
    started = time.monotonic()
    with quiet():
        predictor = TimeSeriesPredictor(
            target=target, prediction_length=horizon, freq=freq, eval_metric=spec.metric, known_covariates_names=roles.known or None,
            path=str(build.model_dir / PREDICTOR), verbosity=0,
        ).fit(train_part, presets=spec.presets, hyperparameters=hyperparameters, time_limit=spec.time_limit, random_seed=spec.seed)
    fit_seconds = time.monotonic() - started
    _report_models(predictor, display)
    outcome = _outcome(predictor, series, train_part, data, counts, previous, display, fit_seconds, spec.seed, roles)
    outcome.info.update(schema={"target": target, "timestamp": stamp, "item_id": item, "horizon": horizon, "key": spec.key, **roles.schema()},
                        time_limit=spec.time_limit)
    outcome.notes.extend(roles.notes)
    if skipped:
        outcome.info["skipped_models"] = skipped
        outcome.notes.extend(skipped)
    if old is not None:
        _drift.attach(outcome, _drift.report(old, new, f"v{base.version}", skip=[stamp]))
    return outcome


# --- %%finetune on an AutoML model ------------------------------------------------------
def update(spec, rows, previous, build, display, rows_from=None) -> Outcome:
    display.phase("checking rows")
    schema = previous.manifest["schema"]
    target, stamp, item, horizon = schema["target"], schema["timestamp"], schema.get("item_id"), schema["horizon"]
    roles = _cov.Roles.of(schema)
    require_columns(rows, {"target column": target, "timestamp column": stamp, "item id column": item, **{f"covariate {c}": c for c in roles.columns}},
                    hint=f"; {previous.name} needs it")
    new = _clean(rows, target, stamp, item, roles.columns)
    _check_lengths(new, item, horizon, minimum=2 * horizon + 1)
    series = _series(new, target, stamp, item, roles.static)
    old_predictor = _load(previous)
    reused = _best_model(old_predictor)
    reused["from_version"] = previous.version
    display.log(f"reusing {reused['model']} ({reused['model_type']}) from v{previous.version}: no model search")
    train_part = series.slice_by_timestep(None, -horizon)
    time_limit = spec.time_limit or previous.manifest.get("time_limit")

    from autogluon.timeseries import TimeSeriesPredictor

    display.phase("training")
    started = time.monotonic()
    with quiet():
        predictor = TimeSeriesPredictor(
            target=target, prediction_length=horizon, freq=old_predictor.freq, eval_metric=old_predictor.eval_metric.name,
            known_covariates_names=roles.known or None, path=str(build.model_dir / PREDICTOR), verbosity=0,
        ).fit(
            train_part, hyperparameters={reused["model_type"]: reused["hyperparameters"]}, time_limit=time_limit,
            enable_ensemble=False, skip_model_selection=True, random_seed=spec.seed,
        )
    fit_seconds = time.monotonic() - started
    old = _clean(previous_rows(rows_from or previous), target, stamp, item, roles.columns)
    data, counts = accumulate(old, new, [c for c in (item, stamp) if c])
    counts.update(trained=len(train_part), held_out=len(series) - len(train_part), series=series.num_items)
    outcome = _outcome(predictor, series, train_part, data, counts, previous, display, fit_seconds, spec.seed, roles, old_predictor)
    outcome.info.update(reused=reused, schema=schema, time_limit=time_limit)
    outcome.notes.append(f"update on the new rows only, with v{previous.version}'s {reused['model']} hyperparameters; holdout = the last {horizon} new steps of each series")
    _drift.attach(outcome, _drift.report(old, new, f"v{(rows_from or previous).version}", skip=[stamp]))
    return outcome


def drift(version, rows) -> dict | None:
    """Per-column drift of ``rows`` (those new to it) against ``version``'s training rows:
    the target, and the item id's unseen series."""
    schema = version.manifest["schema"]
    target, stamp, item = schema["target"], schema["timestamp"], schema.get("item_id")
    columns = [c for c in _cov.Roles.of(schema).columns if c in rows.columns]
    require_columns(rows, {"target column": target, "timestamp column": stamp, "item id column": item}, hint=f"; {version.name} needs it")
    old = _clean(previous_rows(version), target, stamp, item, columns)
    return _drift.report(old, _clean(rows, target, stamp, item, columns), f"v{version.version}", skip=[stamp])


# --- scoring, shared by both ----------------------------------------------------------
def _outcome(predictor, series, train_part, data, counts, previous, display, fit_seconds, seed, roles, old=None) -> Outcome:
    display.phase("evaluating")
    horizon = predictor.prediction_length
    metrics = list(dict.fromkeys([predictor.eval_metric.name, *METRICS]))
    with quiet():
        after = _scores(predictor, series, metrics)
        after_forecast = _forecast(predictor, train_part, series)
        leaderboard = predictor.leaderboard(series)
    display.step(1, 2, **{predictor.eval_metric.name: after[predictor.eval_metric.name]})
    notes = [f"holdout: the last {horizon} steps of each series; the model never trains on them"]
    if previous is not None:
        old = old or _load(previous)
        if old.prediction_length != horizon:
            previous = None
            notes.append(f"the previous version forecasts {old.prediction_length} steps, not {horizon}, so before = the baseline")
    with quiet(), tempfile.TemporaryDirectory(prefix="nbcustom-baseline-") as scratch:
        if previous is not None:
            before_label = f"v{previous.version}"
            before_model = old
        else:
            before_label = "baseline"
            # seasonal naive: the value one season earlier (the last value without a season)
            from autogluon.timeseries import TimeSeriesPredictor

            before_model = TimeSeriesPredictor(
                target=predictor.target, prediction_length=horizon, freq=predictor.freq,
                eval_metric=predictor.eval_metric.name, path=scratch, verbosity=0,
            ).fit(train_part, hyperparameters={"SeasonalNaive": {}}, enable_ensemble=False, skip_model_selection=True, random_seed=seed)
            baseline = "seasonal naive: each step repeats the value one season earlier"
            notes.insert(0, f"before = {baseline}, since there is no previous version")
        before = _scores(before_model, series, metrics)
        before_forecast = _forecast(before_model, train_part, series)
    display.step(2, 2)
    notes.append("leaderboard scores are in AutoGluon's higher-is-better form (error metrics negated)")
    chart = _chart(series, train_part, before_forecast, after_forecast, predictor.target, before_label, horizon, roles.known)
    examples = _examples(series, train_part, before_forecast, after_forecast, predictor.target)
    columns = [c for c in ("model", "score_test", "score_val", "fit_time_marginal", "pred_time_test") if c in leaderboard]
    if roles.columns:  # models that cannot use covariates are tried all the same
        leaderboard["covariates"] = _cov.used(predictor, leaderboard["model"], roles)
        columns.append("covariates")
    info = {
        **({"baseline": baseline} if previous is None else {}),
        "task": "timeseries",
        "target": predictor.target,
        "problem_type": "forecast",
        "eval_metric": predictor.eval_metric.name,
        "higher_is_better": bool(predictor.eval_metric.greater_is_better_internal),
        "best_model": predictor.model_best,
        "freq": predictor.freq,
        "fit_seconds": round(fit_seconds, 2),
        **({"covariates_used": dict(zip(leaderboard["model"], leaderboard["covariates"]))} if roles.columns else {}),
    }
    return Outcome(
        before=rounded(before), after=rounded(after), counts=counts, train_rows=data, examples=examples,
        charts={"forecast": chart}, tables={"leaderboard": leaderboard[columns]}, info=info, notes=notes,
        before_label=before_label,
    )


def _forecast(predictor, history, series):
    """The forecast after ``history``, given the known covariates of the steps that
    follow it in ``series``."""
    return predictor.predict(history, known_covariates=_cov.future(series, predictor.prediction_length, predictor.known_covariates_names))


def _scores(predictor, series, metrics) -> dict:
    """Metrics on their own scale (AutoGluon reports them negated): lower is better."""
    from autogluon.timeseries.metrics import check_get_evaluation_metric

    raw = predictor.evaluate(series, metrics=metrics)
    return {name: float(raw[name]) * check_get_evaluation_metric(name, predictor.prediction_length).sign for name in metrics}


def _chart(series, train_part, before, after, target, before_label, horizon, known=()) -> bytes:
    """History, actual holdout and both forecasts for the longest series (of those, the one
    where a known covariate was set most often), those steps marked."""
    from ...display.charts import forecast_chart

    lengths = series.num_timesteps_per_item()
    longest = list(lengths.index[lengths == lengths.max()])
    window = 5 * horizon

    def marked(item):
        return _cov.marks(series.loc[item].iloc[-window:], list(known)) if known else None

    item = max(longest, key=lambda i: len((marked(i) or ([],))[0]))  # the one where most was planned
    history = train_part.loc[item][target].iloc[-4 * horizon:]
    actual = series.loc[item][target].iloc[-horizon:]
    b, a = before.loc[item], after.loc[item]
    band = (a.index, a["0.1"], a["0.9"]) if {"0.1", "0.9"} <= set(a.columns) else None
    title = "forecast vs actual" + ("" if item == ITEM else f" ({item})")
    return forecast_chart(history.index, history.values, actual.index, actual.values,
                          {before_label: (b.index, b["mean"]), "new version": (a.index, a["mean"])}, title=title, band=band, marks=marked(item))


def _examples(series, train_part, before, after, target):
    import pandas as pd

    actual = series.slice_by_timestep(-int(before.num_timesteps_per_item().iloc[0]), None)[target]
    frame = pd.DataFrame({"actual": actual, "before": before["mean"], "after": after["mean"]}).reset_index()
    return frame if frame["item_id"].nunique() > 1 or frame["item_id"].iloc[0] != ITEM else frame.drop(columns="item_id")


# --- data checks --------------------------------------------------------------------------
def _clean(rows, target, stamp, item, covariates=()):
    """The columns a forecast uses, typed: timestamps parsed, the target numeric, the
    covariates' booleans 0/1."""
    import pandas as pd

    frame = _cov.typed(rows[[c for c in (item, stamp, target, *covariates) if c]].copy(), covariates)
    _parse_stamps(frame, stamp)
    if not pd.api.types.is_numeric_dtype(frame[target]) or pd.api.types.is_bool_dtype(frame[target]):
        raise NbCustomError(f"--target {target} must be numeric to forecast, but it holds {frame[target].dtype} values such as {frame[target].iloc[0]!r}")
    frame[target] = frame[target].astype("float64")
    if len(frame) and frame[target].isna().all():
        raise NbCustomError(f"--target {target} is NULL in all {len(frame)} rows: select rows that have a value (WHERE {target} IS NOT NULL)")
    keys = [c for c in (item, stamp) if c]
    dup = frame.duplicated(keys, keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        where = f"{item} {first[item]!r} at " if item else ""
        raise NbCustomError(
            f"{int(dup.sum())} rows share a timestamp within a series (first: {where}{first[stamp]}): "
            "aggregate them in the SQL (GROUP BY" + (f" {item}," if item else "") + f" {stamp}) or add --item-id COL"
        )
    return frame.reset_index(drop=True)


def _parse_stamps(frame, stamp) -> None:
    """``frame[stamp]`` as naive datetimes, or a one-line error."""
    import pandas as pd

    try:
        with warnings.catch_warnings():  # "could not infer format": the values are read one by one, or the error says why
            warnings.simplefilter("ignore", UserWarning)
            frame[stamp] = pd.to_datetime(frame[stamp])
    except (ValueError, TypeError) as e:
        raise NbCustomError(
            f"--timestamp {stamp}: cannot read its values as dates ({str(e).splitlines()[0][:80]}): "
            "choose a DATE or TIMESTAMP column, or cast it in the SQL"
        ) from None
    if getattr(frame[stamp].dt, "tz", None) is not None:
        frame[stamp] = frame[stamp].dt.tz_convert(None)
    if frame[stamp].isna().any():
        raise NbCustomError(f"--timestamp {stamp}: {int(frame[stamp].isna().sum())} rows have no timestamp; filter them out in the SQL")


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _renamed(frame, stamp, item):
    frame = frame.rename(columns={stamp: "timestamp", **({item: "item_id"} if item else {})})
    if not item:
        frame["item_id"] = ITEM
    return frame


def _series(frame, target, stamp, item, static=()):
    """AutoGluon's frame: the target and covariates by (item id, timestamp), the static
    features one row per series."""
    from autogluon.timeseries import TimeSeriesDataFrame

    frame = _renamed(frame, stamp, item)
    static = list(static)
    features = frame.groupby("item_id", sort=False)[static].first().reset_index() if static else None
    columns = ["item_id", "timestamp", target, *(c for c in frame.columns if c not in ("item_id", "timestamp", target, *static))]
    return TimeSeriesDataFrame.from_data_frame(frame[columns], id_column="item_id", timestamp_column="timestamp", static_features_df=features)


def _check_lengths(frame, item, horizon, minimum):
    """Each series (rows of one ``item``, or all rows) long enough for the holdout and training."""
    import pandas as pd

    lengths = frame.groupby(item, sort=True).size() if item else pd.Series({ITEM: len(frame)})
    short = lengths[lengths < minimum]
    if len(short):
        which = "the series has" if short.index[0] == ITEM else f"series {_plain(short.index[0])!r} has"
        raise NbCustomError(
            f"{which} {int(short.iloc[0])} rows; with --horizon {horizon} each series needs at least {minimum} "
            f"({horizon} held out, the rest to train and validate): add rows or lower --horizon"
        )


def _frequency(series) -> str:
    freq = series.infer_frequency()
    if freq == "IRREG":
        raise NbCustomError("the timestamps are not evenly spaced within each series: bucket them in the SQL, e.g. date_trunc('day', ts)")
    return freq


# --- models -------------------------------------------------------------------------------
def _hyperparameters(presets: str):
    """The presets' model list without pretrained forecasters whose weights are not in the
    local cache (offline, each would fail with a long traceback); and what was left out."""
    from autogluon.timeseries.configs.hyperparameter_presets import get_hyperparameter_presets
    from autogluon.timeseries.configs.predictor_presets import get_predictor_presets

    preset = get_predictor_presets().get(presets)
    if preset is None:
        raise NbCustomError(f"--presets {presets}: unknown for time series; use medium_quality, high_quality or best_quality")
    models = preset.get("hyperparameters", "default")
    models = dict(get_hyperparameter_presets()[models] if isinstance(models, str) else models)
    skipped = []
    for key in [k for k in models if k in PRETRAINED]:
        configs = models[key] if isinstance(models[key], list) else [models[key]]
        kept = [c for c in configs if _cached(c.get("model_path") or PRETRAINED[key])]
        for c in configs:
            if c not in kept:
                skipped.append(f"{key} ({c.get('model_path') or PRETRAINED[key]}) left out: its pretrained weights are not in the local Hugging Face cache")
        if kept:
            models[key] = kept
        else:
            del models[key]
    if not models:
        raise NbCustomError(f"--presets {presets} uses only pretrained models whose weights are not cached here: use medium_quality")
    return models, skipped


def _cached(path: str) -> bool:
    if os.path.isdir(path):
        return True
    from autogluon.timeseries.models.chronos.model import MODEL_ALIASES

    path = MODEL_ALIASES.get(path, path)
    repo = path if "/" in path else f"Datadog/{path}"  # Toto2 aliases such as Toto-2.0-4m
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, local_files_only=True)
        return True
    except Exception:  # not cached (or no hub client): the model cannot load offline
        return False


def _report_models(predictor, display) -> None:
    board = predictor.leaderboard()
    for i, row in enumerate(board.itertuples(), 1):
        display.step(i, len(board), val_score=float(row.score_val))
        display.log(f"{row.model}: validation {predictor.eval_metric.name} {-row.score_val:.4g}")


def _best_model(predictor) -> dict:
    """The previous version's best single model: its type and hyperparameters."""
    board = predictor.leaderboard()
    board = board[~board["model"].str.contains("Ensemble")].sort_values("score_val", ascending=False)
    name = board["model"].iloc[0]
    model = predictor._trainer.load_model(name)
    model = getattr(model, "most_recent_model", None) or model
    hyperparameters = {k: v for k, v in model.get_hyperparameters().items() if _jsonable(v)}
    return {"model": name, "model_type": type(model).__name__.removesuffix("Model"), "hyperparameters": hyperparameters}


def _jsonable(value) -> bool:
    import json

    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


# --- %%predict ------------------------------------------------------------------------------
def _load(version):
    from autogluon.timeseries import TimeSeriesPredictor

    with quiet():
        return TimeSeriesPredictor.load(str(version.model_dir / PREDICTOR))


class ForecastModel:
    """A loaded time-series version. ``predict(rows)``: rows with the target are history,
    and the forecast is of the next ``horizon`` steps of each of their series (item id,
    ``timestamp``, ...); rows without
    it are planned steps (item id, timestamp, the known covariates) after the version's own
    rows, each returned with its forecast. ``forecast()``: the next ``horizon`` steps after
    the version's rows. Forecasts come as ``prediction``, ``p10`` ... ``p90``."""

    def __init__(self, version):
        self.version = version
        self.schema = version.manifest["schema"]
        self.roles = _cov.Roles.of(self.schema)
        self._predictor = None

    @property
    def predictor(self):
        """The AutoGluon predictor, loaded on first use (a query without the model's columns
        fails before the load)."""
        if self._predictor is None:
            self._predictor = _load(self.version)
        return self._predictor

    def predict(self, rows, **_):
        target, stamp, item = self.schema["target"], self.schema["timestamp"], self.schema.get("item_id")
        if target not in rows.columns:
            return self._planned(rows)
        if self.roles.known:
            raise NbCustomError(self._needs_plan())
        require_columns(rows, {"target column": target, "timestamp column": stamp, "item id column": item, **{f"covariate {c}": c for c in self.roles.columns}},
                        hint=f"; {self.version.name} forecasts from it")
        history = _series(_clean(rows, target, stamp, item, self.roles.columns), target, stamp, item, self.roles.static)
        return self._named(self._predict(history))

    def forecast(self):
        """The next ``horizon`` steps after the version's own rows (a model without known
        covariates)."""
        if self.roles.known:
            raise NbCustomError(self._needs_plan())
        return self._named(self._predict(self._history(self._stored())))

    def _needs_plan(self) -> str:
        item, stamp, horizon = self.schema.get("item_id"), self.schema["timestamp"], self.schema["horizon"]
        columns = ", ".join(c for c in (item, stamp, *self.roles.known) if c)
        return (f"{self.version.name} forecasts with known covariates ({', '.join(self.roles.known)}): %%predict it over the planned rows "
                f"of the next {horizon} steps ({columns}), without {self.schema['target']}")

    def _stored(self):
        """The version's own rows (train + holdout), typed, with its covariates."""
        return _clean(previous_rows(self.version), self.schema["target"], self.schema["timestamp"], self.schema.get("item_id"), self.roles.columns)

    def _history(self, rows):
        return _series(rows, self.schema["target"], self.schema["timestamp"], self.schema.get("item_id"), self.roles.static)

    def _planned(self, rows):
        """The forecast of each planned row, from the version's rows before it."""
        stamp, item, horizon = self.schema["timestamp"], self.schema.get("item_id"), self.schema["horizon"]
        require_columns(rows, {"timestamp column": stamp, "item id column": item}, hint=f"; {self.version.name} forecasts the series it names")
        plan = rows.copy()
        _parse_stamps(plan, stamp)
        plan = _renamed(plan, stamp, item)
        stored = self._stored()  # read once: the steps after it, and the history of the planned series
        series = _renamed(stored, stamp, item)["item_id"]
        known = _cov.planned(_cov.typed(plan, [c for c in self.roles.known if c in plan]), _renamed(stored, stamp, item), item, stamp,
                             self.roles.known, horizon, self.predictor.freq, self.version.name)
        history = self._history(stored[series.isin(plan["item_id"].unique()).to_numpy()])
        forecast = self._predict(history, known.set_index(["item_id", "timestamp"]) if self.roles.known else None)
        merged = plan[["item_id", "timestamp"]].merge(forecast, on=["item_id", "timestamp"], how="left")
        out = rows.reset_index(drop=True).copy()
        for column in merged.columns.drop(["item_id", "timestamp"]):
            out[column] = merged[column].to_numpy()
        return out

    def _predict(self, history, known=None):
        with quiet():
            forecast = self.predictor.predict(history, known_covariates=known)
        out = forecast.reset_index().rename(columns={"mean": "prediction"})
        return out.rename(columns={c: f"p{round(float(c) * 100)}" for c in out.columns if _is_quantile(c)})

    def _named(self, out):
        """The forecast's series column named as in the rows (none for one series)."""
        item = self.schema.get("item_id")
        return out.rename(columns={"item_id": item}) if item else out.drop(columns="item_id")


def _is_quantile(name) -> bool:
    try:
        return 0 < float(name) < 1
    except (TypeError, ValueError):
        return False


def load(version):
    return ForecastModel(version)
