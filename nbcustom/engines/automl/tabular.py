"""Tabular AutoML: ``TabularPredictor`` retrain, no-search update, scoring and prediction."""

from __future__ import annotations

import time

from ...errors import NbCustomError
from .. import Outcome
from . import drift as _drift
from .common import MIN_HOLDOUT, MIN_TRAIN, accumulate, in_holdout, previous_rows, quiet, require_columns, rounded, val_scores

PREDICTOR = "predictor"  # folder inside the version's model/
CLASSIFICATION_METRICS = ("accuracy", "balanced_accuracy", "f1", "roc_auc", "log_loss")
REGRESSION_METRICS = ("root_mean_squared_error", "mean_absolute_error", "r2")


# --- %%retrain ------------------------------------------------------------------------
def train(spec, rows, previous, build, display, rows_from=None) -> Outcome:
    display.phase("checking rows")
    target = spec.target
    require_columns(rows, {"--target": target, "--key": spec.key})
    base = rows_from or previous
    old = previous_rows(base)
    if previous is not None and previous.manifest.get("target") not in (None, target):
        raise NbCustomError(f"{previous.name} predicts {previous.manifest['target']!r}, not {target!r}: choose another name to predict {target}")
    data, counts = accumulate(old, rows, spec.key)
    data, missing = _with_target(data, target)
    _check_target(data, missing, target)
    problem_type, metric = _problem(data[target], spec.metric, target)
    _check_presets(spec.presets)
    holdout_mask = in_holdout(data, spec.eval_frac, spec.key)
    train_part, holdout = data[~holdout_mask], data[holdout_mask]
    _check_sizes(len(data), len(train_part), len(holdout), "--eval-frac")
    counts.update(trained=len(train_part), held_out=len(holdout), missing_target=missing)
    display.log(f"{len(data)} rows ({counts['previous']} kept + {counts['new']} new, {counts['duplicates_dropped']} duplicates dropped, {counts['replaced']} replaced); {len(holdout)} held out")

    from autogluon.tabular import TabularPredictor

    display.phase("training")
    started = time.monotonic()
    with quiet():
        predictor = TabularPredictor(
            label=target, problem_type=problem_type, eval_metric=metric,
            path=str(build.model_dir / PREDICTOR), verbosity=0,
        ).fit(_without_key(train_part, spec.key), time_limit=spec.time_limit, presets=spec.presets, callbacks=[_progress(display)])
    fit_seconds = time.monotonic() - started
    outcome = _outcome(predictor, holdout, data, counts, previous, display, fit_seconds, key=spec.key)
    outcome.info.update(schema={"target": target, "key": spec.key}, time_limit=spec.time_limit)
    if old is not None:
        _drift.attach(outcome, _drift.report(old, rows, f"v{base.version}", skip=[spec.key]))
    return outcome


# --- %%finetune on an AutoML model ------------------------------------------------------
def update(spec, rows, previous, build, display, rows_from=None) -> Outcome:
    display.phase("checking rows")
    target = previous.manifest["target"]
    require_columns(rows, {"target column": target}, hint=f"; {previous.name} predicts {target}")
    new_rows, missing = _with_target(rows.reset_index(drop=True), target)
    _check_target(new_rows, missing, target, chosen=False)
    holdout_mask = in_holdout(new_rows, spec.eval_frac)
    train_part, holdout = new_rows[~holdout_mask], new_rows[holdout_mask]
    _check_sizes(len(new_rows), len(train_part), len(holdout), "--eval-frac")
    old_predictor = _load(previous)  # the rows are checked first: a mistake costs no load
    reused = _best_model(old_predictor)
    reused["from_version"] = previous.version
    display.log(f"reusing {reused['model']} ({reused['model_type']}) from v{previous.version}: no model search")
    schema = previous.manifest["schema"]
    time_limit = spec.time_limit or previous.manifest.get("time_limit")

    from autogluon.tabular import TabularPredictor

    display.phase("training")
    started = time.monotonic()
    with quiet():
        predictor = TabularPredictor(
            label=target, problem_type=old_predictor.problem_type, eval_metric=old_predictor.eval_metric.name,
            path=str(build.model_dir / PREDICTOR), verbosity=0,
        ).fit(
            _without_key(train_part, schema.get("key")), hyperparameters={reused["model_type"]: reused["hyperparameters"]}, time_limit=time_limit,
            num_bag_folds=0, num_stack_levels=0, fit_weighted_ensemble=False, callbacks=[_progress(display)],
        )
    fit_seconds = time.monotonic() - started
    # a later %%retrain starts from everything seen so far, not only this update's rows
    data, counts = accumulate(previous_rows(rows_from or previous), rows, schema.get("key"))
    counts.update(trained=len(train_part), held_out=len(holdout), missing_target=missing)
    outcome = _outcome(predictor, holdout, data, counts, previous, display, fit_seconds, reused=reused, old=old_predictor)
    outcome.info.update(schema=schema, time_limit=time_limit)
    outcome.notes.append(f"update on the {len(new_rows)} new rows only, with v{previous.version}'s {reused['model']} hyperparameters; holdout = {len(holdout)} of the new rows")
    _drift.attach(outcome, drift(rows_from or previous, rows))
    return outcome


def drift(version, rows) -> dict | None:
    """Per-column drift of ``rows`` (those new to it) against ``version``'s training rows."""
    return _drift.report(previous_rows(version), rows, f"v{version.version}", skip=[version.manifest.get("schema", {}).get("key")])


# --- scoring, shared by both ----------------------------------------------------------
def _outcome(predictor, holdout, data, counts, previous, display, fit_seconds, key=None, reused=None, old=None) -> Outcome:
    target = predictor.label
    display.phase("evaluating")
    with quiet():
        after_pred = _predictions(predictor, holdout)
        after = _scores(predictor, holdout[target], after_pred)
        if previous is not None:
            old = old or _load(previous)
            before_pred = _aligned(_predictions(old, _with_features(old, holdout)), predictor)
            before_label, baseline = f"v{previous.version}", None
        else:
            before_pred, baseline = _baseline(predictor, data.loc[~data.index.isin(holdout.index), target], len(holdout))
            before_label = "baseline"
        before = _scores(predictor, holdout[target], before_pred)
        leaderboard = predictor.leaderboard(holdout, silent=True)
    display.step(1, 2, **{predictor.eval_metric.name: after.get(predictor.eval_metric.name, float("nan"))})
    display.phase("feature importance")
    charts = {}
    importance, importance_model = _importance(predictor, holdout)
    if importance:
        from ...display.charts import bar_chart

        charts["feature_importance"] = bar_chart(importance, f"feature importance ({importance_model}, holdout)", "drop in " + predictor.eval_metric.name)
    # the holdout rows as the user knows them: a few identifying columns, target, before, after
    shown = [key] if key else [c for c in holdout.columns if c != target][:4]
    examples = holdout[[*shown, target]].copy()
    examples["before"] = _labels(before_pred, predictor)
    examples["after"] = _labels(after_pred, predictor)
    columns = [c for c in ("model", "score_test", "score_val", "fit_time", "pred_time_test", "stack_level") if c in leaderboard]
    notes = [
        f"holdout: {len(holdout)} rows chosen by a stable hash of each row"
        + (f" (of --key {key})" if key else "")
        + ", so the same rows are held out in every version; the model never trains on them",
        "leaderboard scores are in AutoGluon's higher-is-better form (error metrics negated)",
    ]
    if baseline:
        notes.insert(0, f"before = {baseline}, since there is no previous version")
    info = {
        "task": "tabular",
        "target": target,
        "problem_type": predictor.problem_type,
        "eval_metric": predictor.eval_metric.name,
        "higher_is_better": bool(predictor.eval_metric.greater_is_better_internal),
        "best_model": predictor.model_best,
        "fit_seconds": round(fit_seconds, 2),
        "feature_importance": importance,
        "feature_importance_model": importance_model,
        "history": {"val_score": val_scores(predictor, leaderboard)},
    }
    if reused:
        info["reused"] = reused
    if baseline:
        info["baseline"] = baseline
    return Outcome(
        before=rounded(before), after=rounded(after), counts=counts, train_rows=data, examples=examples,
        charts=charts, tables={"leaderboard": leaderboard[columns]}, info=info, notes=notes,
        before_label=before_label,
    )


def _predictions(predictor, rows):
    """Class probabilities where the model has them (so proba metrics work), else labels."""
    if predictor.can_predict_proba:
        return predictor.predict_proba(rows)
    return predictor.predict(rows)


def _aligned(pred, predictor):
    """The previous model's probabilities over the new model's classes (a class it never
    saw gets probability 0)."""
    if predictor.can_predict_proba and hasattr(pred, "columns"):
        return pred.reindex(columns=predictor.class_labels, fill_value=0.0)
    return pred


def _baseline(predictor, y_train, n):
    """The trivial model a first version is compared with: the class frequencies of the
    training rows (predicting the majority class) or their mean."""
    import pandas as pd

    if predictor.can_predict_proba:
        freq = y_train.value_counts(normalize=True).reindex(predictor.class_labels, fill_value=0.0)
        majority = freq.idxmax()
        majority = majority.item() if hasattr(majority, "item") else majority
        # a hair above the rest so the argmax is the majority class even on ties
        freq[majority] += 1e-9
        return pd.DataFrame([freq.to_numpy()] * n, columns=predictor.class_labels), f"the majority class {majority!r} (class frequencies as probabilities)"
    mean = float(pd.to_numeric(y_train).mean())
    return pd.Series([mean] * n), f"the mean of the training target ({mean:.4g})"


def _scores(predictor, y_true, pred) -> dict:
    """Metrics on the original scale (error metrics positive, lower is better)."""
    from autogluon.core.metrics import get_metric

    if hasattr(pred, "index"):
        pred = pred.set_axis(y_true.index, axis=0)
    raw = predictor.evaluate_predictions(y_true=y_true, y_pred=pred, auxiliary_metrics=True, silent=True)
    wanted = [predictor.eval_metric.name, *(CLASSIFICATION_METRICS if predictor.can_predict_proba else REGRESSION_METRICS)]
    scores = {}
    for name in dict.fromkeys(wanted):
        if name in raw:
            scorer = get_metric(name, predictor.problem_type)
            scores[name] = float(raw[name]) * (1 if scorer.greater_is_better_internal else -1)
    return scores


def _labels(pred, predictor):
    if hasattr(pred, "columns"):
        return pred.idxmax(axis=1).to_numpy()
    return pred.to_numpy()


def _importance(predictor, holdout) -> dict:
    """Permutation importance on (a sample of) the holdout, for the quickest to predict of the
    three best single models: one shuffle per feature and no ensemble keep it a small
    fraction of the fit (it predicts once per feature)."""
    board = predictor.leaderboard(silent=True)
    top = board[board["stack_level"] == 1].sort_values("score_val", ascending=False).head(3)
    base = top.sort_values("pred_time_val")["model"]
    try:
        with quiet():
            frame = predictor.feature_importance(
                holdout, model=base.iloc[0] if len(base) else None, subsample_size=min(len(holdout), 300),
                num_shuffle_sets=1, silent=True,
            )
    except Exception:  # importance is a chart, not the run: a model that cannot do it skips it
        return {}, None
    return {str(k): round(float(v), 6) for k, v in frame["importance"].items()}, base.iloc[0] if len(base) else predictor.model_best


def _progress(display):
    from .progress import Progress

    return Progress(display)


# --- checks -------------------------------------------------------------------------------
def _with_target(data, target):
    """Rows with a target value; rows without one cannot train or score."""
    known = data[target].notna().to_numpy()
    return data[known].reset_index(drop=True), int((~known).sum())


def _check_target(data, missing: int, target: str, chosen: bool = True) -> None:
    """Rows left to learn from once those without a target are dropped: none is one line.
    ``chosen``: the target was given as --target (not inherited from the previous version)."""
    if not len(data):
        raise NbCustomError(
            f"target {target!r} is NULL in all {missing} rows: select rows that have a value (WHERE {target} IS NOT NULL)"
            + (" or choose another --target" if chosen else "")
        )


def _problem(y, metric: str | None, target: str):
    """(problem_type or None for AutoGluon's choice, metric): a metric that cannot apply to
    this target is a one-line error before any fitting."""
    import pandas as pd
    from autogluon.core.metrics import BINARY_METRICS, MULTICLASS_METRICS, REGRESSION_METRICS as REGRESSION

    if y.nunique() < 2:
        raise NbCustomError(f"target {target!r} has a single value ({_plain(y.iloc[0])!r}): there is nothing to learn; add rows with other values or choose another --target")
    numeric = pd.api.types.is_numeric_dtype(y) and not pd.api.types.is_bool_dtype(y)
    if metric is None:
        return None, None
    known = set(REGRESSION) | set(BINARY_METRICS) | set(MULTICLASS_METRICS)
    if metric not in known:
        raise NbCustomError(f"--metric {metric}: unknown; try accuracy, f1, roc_auc, log_loss, rmse, mae, r2")
    if metric in REGRESSION and metric not in BINARY_METRICS and metric not in MULTICLASS_METRICS:
        if not numeric:
            raise NbCustomError(f"--metric {metric} is for a numeric target, but {target!r} holds {y.dtype} values such as {y.iloc[0]!r}: choose a classification metric such as accuracy")
        return "regression", metric
    if numeric and metric not in REGRESSION and y.nunique() > 50 and not (y.dropna() % 1 == 0).all():
        raise NbCustomError(f"--metric {metric} is for classes, but {target!r} holds continuous numbers: choose rmse, mae or r2")
    return ("binary" if y.nunique() == 2 else "multiclass") if metric not in REGRESSION else None, metric


def _check_presets(presets: str) -> None:
    from autogluon.tabular.configs.presets_configs import tabular_presets_alias, tabular_presets_dict

    if presets not in tabular_presets_dict and presets not in tabular_presets_alias:
        raise NbCustomError(f"--presets {presets}: unknown for tabular models; use medium_quality, good_quality, high_quality or best_quality")


def _check_sizes(total, trained, held_out, flag):
    if held_out < MIN_HOLDOUT or trained < MIN_TRAIN:
        raise NbCustomError(
            f"{total} rows give {held_out} held out and {trained} to train; the holdout needs at least {MIN_HOLDOUT} "
            f"and training {MIN_TRAIN}: add rows or change {flag}"
        )


def _without_key(rows, key):
    """The rows a predictor learns from: a --key column identifies rows (for the holdout and
    upserts) and is no feature, so predictions never need it."""
    return rows.drop(columns=[key]) if key else rows


def _with_features(predictor, rows):
    """``rows`` with any feature the model knows but the rows lack, as missing values."""
    missing = [f for f in predictor.original_features if f not in rows.columns]
    return rows.assign(**{f: None for f in missing}) if missing else rows


def _best_model(predictor) -> dict:
    """The previous version's best single model: its type key and hyperparameters."""
    from autogluon.tabular.registry import ag_model_registry

    board = predictor.leaderboard(silent=True)
    board = board[~board["model"].str.startswith("WeightedEnsemble")].sort_values("score_val", ascending=False)
    name = board["model"].iloc[0]
    info = predictor.model_info(name)
    type_name = info.get("bagged_info", {}).get("child_model_type") or info["model_type"]
    cls = next(c for c in ag_model_registry.model_cls_list if c.__name__ == type_name)
    hyperparameters = predictor.model_hyperparameters(name, include_ag_args_ensemble=False, output_format="all")
    # what fitting settled on (e.g. LightGBM's boosting rounds after early stopping), so the
    # update trains that much and no more
    fitted = info.get("bagged_info", {}).get("child_hyperparameters_fit") or info.get("hyperparameters_fit") or {}
    hyperparameters = {**hyperparameters, **fitted}
    return {"model": name, "model_type": ag_model_registry.key(cls), "hyperparameters": _plain(hyperparameters)}


def _plain(value):
    """JSON-safe copy of a hyperparameter dict (numpy scalars become numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


# --- %%predict ------------------------------------------------------------------------------
def _load(version):
    from autogluon.tabular import TabularPredictor

    with quiet():
        return TabularPredictor.load(str(version.model_dir / PREDICTOR), verbosity=0, require_py_version_match=False)


class TabularModel:
    """A loaded tabular version: ``predict(rows)`` appends ``prediction`` and, for
    classification, a ``proba_<class>`` column per class."""

    def __init__(self, version):
        self.version = version
        self.predictor = _load(version)

    def predict(self, rows, **_):
        predictor = self.predictor
        missing = [f for f in predictor.original_features if f not in rows.columns]
        if missing:
            raise NbCustomError(f"{self.version.name} needs column {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": select it in the query")
        with quiet():
            out = rows.reset_index(drop=True).copy()
            out["prediction"] = predictor.predict(out).to_numpy()
            if predictor.can_predict_proba:
                proba = predictor.predict_proba(out[predictor.original_features])
                for label in proba.columns:
                    out[f"proba_{label}"] = proba[label].to_numpy()
        return out


def load(version):
    return TabularModel(version)
