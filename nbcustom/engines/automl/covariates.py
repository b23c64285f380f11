"""What a forecast knows besides its target: known covariates (``--known``: their future
values are given when forecasting), past covariates (every other column that varies within
a series) and static features (a column constant within every series), as AutoGluon's
``TimeSeriesPredictor`` takes them; and the planned rows ``%%predict`` is handed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...errors import NbCustomError

MAX_CATEGORIES = 100  # a text column with more distinct values is an identifier, not a feature
SUPPORT = (("known", "supports_known_covariates"), ("past", "supports_past_covariates"), ("static", "supports_static_features"))


@dataclass
class Roles:
    known: list = field(default_factory=list)
    past: list = field(default_factory=list)
    static: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def columns(self) -> list:
        return [*self.known, *self.past, *self.static]

    def schema(self) -> dict:
        return {"known": self.known, "past": self.past, "static": self.static}

    @classmethod
    def of(cls, schema: dict) -> "Roles":
        """The roles a version recorded (none for a version made before covariates)."""
        return cls(*(list(schema.get(k) or []) for k in ("known", "past", "static")))


def roles(rows, target, stamp, item, known: list, exclude=(), old=None) -> Roles:
    """Each column's role; ``old``: the previous version's rows, whose columns bound the
    past and static ones (a known covariate they lack is an error)."""
    import pandas as pd

    taken = {c for c in (target, stamp, item, *exclude) if c}
    for column in known:
        if column not in rows.columns:
            raise NbCustomError(f"--known {column}: no such column in the query; select it or leave it out of --known")
        if column in taken:
            raise NbCustomError(f"--known {column}: it is the target, timestamp, item id or key column; name covariates only")
        if old is not None and column not in old.columns:
            raise NbCustomError(f"--known {column}: the previous version's rows have no such column; retrain under a new name to add it")
    out = Roles(known=list(known))
    for column in rows.columns:
        if column in taken or column in known:
            continue
        values = rows[column]
        numeric = pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)
        if old is not None and column not in old.columns:
            out.notes.append(f"{column} not used: the previous version's rows have no such column")
        elif pd.api.types.is_datetime64_any_dtype(values):
            out.notes.append(f"{column} not used: a second time column")
        elif not numeric and values.nunique() > MAX_CATEGORIES:
            out.notes.append(f"{column} not used: a text column of more than {MAX_CATEGORIES} values (an identifier?)")
        elif item and (rows.groupby(item)[column].nunique(dropna=False) <= 1).all():
            out.static.append(column)
        elif not item and values.nunique(dropna=False) <= 1:
            out.notes.append(f"{column} not used: constant in the one series")
        else:
            out.past.append(column)
    if out.known:
        out.notes.append(f"known covariates (their future values are given when forecasting): {', '.join(out.known)}")
    if out.past:
        out.notes.append(f"past covariates (seen up to the forecast's start): {', '.join(out.past)}")
    if out.static:
        out.notes.append(f"static features (constant within every series): {', '.join(out.static)}")
    return out


def typed(frame, columns):
    """Booleans as 0/1 (AutoGluon's covariates are numbers or categories)."""
    import pandas as pd

    for column in columns:
        if pd.api.types.is_bool_dtype(frame[column]):
            frame[column] = frame[column].astype("int64")
    return frame


def future(series, horizon: int, known: list):
    """The known covariates of the last ``horizon`` steps of ``series`` (the holdout), or None."""
    return series.slice_by_timestep(-horizon, None)[known] if known else None


def planned(rows, history, item: str, stamp: str, known: list, horizon: int, freq: str, name: str):
    """Validate the planned rows ``rows`` (item id, timestamp, known covariates) against the
    stored ``history`` (renamed to ``item_id``/``timestamp``): each row among the next
    ``horizon`` steps of a known series. Returns the known covariates of every step of
    those series' horizons (item_id, timestamp, ...), a step not planned taking the nearest
    planned values."""
    import pandas as pd

    missing = [c for c in known if c not in rows.columns]
    if missing:
        raise NbCustomError(f"the rows lack {name}'s known covariate{'s' if len(missing) > 1 else ''} {', '.join(missing)}: add the planned values to the query")
    for column in known:
        nulls = int(rows[column].isna().sum())
        if nulls:
            raise NbCustomError(f"known covariate {column} is NULL in {nulls} rows: give its planned value in every row")
    last = history.groupby("item_id")["timestamp"].max()
    unknown = sorted(set(rows["item_id"]) - set(last.index), key=str)
    if unknown:
        raise NbCustomError(f"{item} {unknown[0]!r}: not among the series {name} was trained on; it forecasts those series only")
    grid = []
    for series, group in rows.groupby("item_id", sort=False):
        steps = pd.date_range(last[series], periods=horizon + 1, freq=freq)[1:]
        outside = group[~group["timestamp"].isin(steps)]
        if len(outside):
            where = f"{item} {series!r}: " if item else ""
            raise NbCustomError(
                f"{where}{stamp} {outside['timestamp'].iloc[0]:%Y-%m-%d %H:%M} is not one of the next {horizon} steps after the last row "
                f"({steps[0]:%Y-%m-%d} to {steps[-1]:%Y-%m-%d}): forecast at most --horizon steps ahead, on the series' step ({freq})"
            )
        steps = pd.DataFrame({"item_id": series, "timestamp": steps})
        grid.append(steps.merge(group[["timestamp", *known]], on="timestamp", how="left").ffill().bfill())
    return pd.concat(grid, ignore_index=True)


def used(predictor, names, roles: Roles) -> list[str]:
    """Per model of the leaderboard: which of the covariates it used."""
    out = []
    for name in names:
        if "Ensemble" in name:
            out.append("through its models")
            continue
        model = predictor._trainer.load_model(name)
        model = getattr(model, "most_recent_model", None) or model
        kinds = [kind for kind, attr in SUPPORT if getattr(roles, kind) and getattr(model, attr, False)]
        out.append(", ".join(kinds) or "none")
    return out


def marks(frame, known: list):
    """Timestamps of ``frame`` (one series, indexed by timestamp) where a two-valued known
    covariate is off its usual value (a promotion week), with the covariates' names."""
    flags = [c for c in known if frame[c].nunique() == 2]
    if not flags:
        return None
    set_ = False
    for column in flags:
        set_ = set_ | (frame[column] != frame[column].mode().iloc[0])
    return list(frame.index[set_]), ", ".join(flags)
