"""What the tabular and time-series tasks share: rows across versions, the stable hash
holdout, column checks and keeping AutoGluon quiet."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import warnings

from ...errors import NbCustomError

MIN_HOLDOUT = 5  # rows: fewer make the before/after scores noise
MIN_TRAIN = 10


def previous_rows(previous):
    """The rows the previous version kept (train + holdout), or None for a first version."""
    if previous is None:
        return None
    import pandas as pd

    path = previous.path / "train.parquet"
    if not path.exists():
        raise NbCustomError(f"{previous.name}@{previous.version} has no train.parquet to retrain from; retrain it from the full data under a new name")
    return pd.read_parquet(path)


def row_hashes(frame, columns=None):
    """A stable hex digest per row of ``columns`` (default: all), independent of dtype
    details (``3`` and ``3.0`` hash alike) and of the column order."""
    columns = sorted(columns if columns is not None else frame.columns, key=str)
    text = None
    for column in columns:
        part = f"{column}=" + _canonical(frame[column])
        text = part if text is None else text + "\x1f" + part
    return text.map(lambda t: hashlib.sha256(t.encode()).hexdigest())


def _canonical(series):
    import pandas as pd

    missing = series.isna()
    if pd.api.types.is_bool_dtype(series):
        text = series.astype(str)
    elif pd.api.types.is_numeric_dtype(series):
        text = series.astype("float64").map(repr)
    elif pd.api.types.is_datetime64_any_dtype(series):
        text = series.map(lambda v: v.isoformat() if not pd.isna(v) else "")
    else:
        text = series.astype(str)
    return text.where(~missing, "").astype(str)


def in_holdout(frame, frac: float, key: str | list | None = None):
    """Boolean mask: the row is in the holdout. Decided by a hash of the row (or of its
    ``key``), so a row is in or out of the holdout in every version alike."""
    columns = [key] if isinstance(key, str) else key
    digests = row_hashes(frame, columns)
    return digests.map(lambda d: int(d[:12], 16) / 16**12 < frac).to_numpy()


def accumulate(old, new, key: str | list | None = None):
    """``old`` rows plus ``new`` rows: exact duplicates dropped, and with ``key`` a new row
    replacing the old row of the same key. Returns (rows, counts)."""
    import pandas as pd

    counts = {"previous": 0 if old is None else len(old), "new": len(new)}
    keys = [key] if isinstance(key, str) else list(key or [])
    columns = list(dict.fromkeys([*(old.columns if old is not None else []), *new.columns]))
    new = new.reindex(columns=columns)
    new_hash = row_hashes(new, columns)
    unique = ~new_hash.duplicated().to_numpy()
    dropped = int((~unique).sum())
    replaced = 0
    if old is not None:
        old = old.reindex(columns=columns)
        seen = set(row_hashes(old, columns))
        fresh = ~new_hash.isin(seen).to_numpy()
        dropped += int((unique & ~fresh).sum())
        unique &= fresh
    new = new[unique]
    if keys:
        # the last of several new rows with one key wins, and it replaces the old row
        new_keys = row_hashes(new, keys)
        last = ~new_keys.duplicated(keep="last").to_numpy()
        replaced += int((~last).sum())
        new, new_keys = new[last], new_keys[last]
        if old is not None:
            stale = row_hashes(old, keys).isin(set(new_keys)).to_numpy()
            replaced += int(stale.sum())
            old = old[~stale]
    parts = [p for p in (old, new) if p is not None and len(p)]
    rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0].reset_index(drop=True) if parts else new
    counts.update(duplicates_dropped=dropped, replaced=replaced, rows=len(rows))
    return rows, counts


def require_columns(rows, columns: dict, hint: str = "") -> None:
    """``columns``: flag -> column name; a missing one is a one-line error."""
    for flag, column in columns.items():
        if column and column not in rows.columns:
            have = ", ".join(map(str, rows.columns[:12])) + (", ..." if len(rows.columns) > 12 else "")
            fix = f"select it in the query or change {flag}" if flag.startswith("--") else "select it in the query"
            raise NbCustomError(f"{flag} {column}: no such column in the query (columns: {have}){hint}; {fix}")


# --- quiet AutoGluon --------------------------------------------------------------------
@contextlib.contextmanager
def quiet():
    """AutoGluon and its model libraries print and warn freely: keep all of it out of the
    cell. The run display still shows progress (it holds its own stream or handle)."""
    # AutoGluon resets its loggers' levels from `verbosity` inside fit, and its handlers
    # hold the original streams, so only a global switch keeps them out for the run.
    disabled = logging.root.manager.disable
    sink = io.StringIO()
    try:
        logging.disable(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


def val_scores(predictor, leaderboard) -> list[list]:
    """[[n, validation score]] of the fitted models in the order they were fitted: the
    run's curve (as the progress display showed it), kept in the manifest for tracking."""
    scores = leaderboard.set_index("model")["score_val"]
    fitted = [m for m in predictor.model_names() if m in scores.index and scores[m] == scores[m]]
    return [[n, round(float(scores[m]), 6)] for n, m in enumerate(fitted, 1)]


def rounded(metrics: dict, digits: int = 6) -> dict:
    return {k: round(float(v), digits) for k, v in metrics.items() if v is not None and v == v}
