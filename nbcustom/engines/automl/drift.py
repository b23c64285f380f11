"""Drift: how far new rows have moved from the rows a version was trained on, per column.

PSI (population stability index) compares two distributions over the same bins:
sum((new - old) * ln(new / old)) over the bins' shares. Numeric columns are binned on the
old rows' quantiles (deciles at most), so each bin holds as many old rows; categorical columns use
their categories, with every category the old rows never had in one "unseen" bin. Missing
values are a bin of their own. Common reading: below 0.1 stable, 0.1-0.25 a moderate
shift, above 0.25 a large one. PSI of two samples of one distribution is about
(bins - 1) * (1/new + 1/old), so few new rows get fewer numeric bins (about 20 rows a bin)
to keep that noise under the reading's thresholds. Pure pandas and numpy.
"""

from __future__ import annotations

import numpy as np

BINS = 10
ROWS_PER_BIN = 20
LARGE = 0.25  # PSI above this: a large shift
_FLOOR = 1e-4  # share given to an empty bin, so ln() stays finite
_MIN_ID_ROWS = 20  # fewer rows all distinct are not evidence of an identifier column


def psi(old_shares, new_shares) -> float:
    """PSI of two share vectors over the same bins."""
    old = np.clip(np.asarray(old_shares, dtype="float64"), _FLOOR, None)
    new = np.clip(np.asarray(new_shares, dtype="float64"), _FLOOR, None)
    return float(np.sum((new - old) * np.log(new / old)))


def column_drift(old, new) -> dict:
    """PSI of one column, plus the share of missing values on each side and (categorical)
    the share of new values the old rows never had."""
    import pandas as pd

    old_missing, new_missing = old.isna(), new.isna()
    figures = {"old_nulls": round(float(old_missing.mean()), 4), "new_nulls": round(float(new_missing.mean()), 4)}
    old_values, new_values = old[~old_missing], new[~new_missing]
    numeric = pd.api.types.is_numeric_dtype(old) and not pd.api.types.is_bool_dtype(old)
    if numeric:
        old_values, new_values = old_values.astype("float64"), pd.to_numeric(new_values, errors="coerce").dropna()
        bins = min(BINS, max(2, len(new_values) // ROWS_PER_BIN))
        edges = np.unique(np.quantile(old_values, np.linspace(0, 1, bins + 1)[1:-1])) if len(old_values) else np.array([])
        old_counts = np.bincount(np.searchsorted(edges, old_values, side="right"), minlength=len(edges) + 1)
        new_counts = np.bincount(np.searchsorted(edges, new_values, side="right"), minlength=len(edges) + 1)
        figures["type"] = "numeric"
    else:
        old_values, new_values = old_values.astype(str), new_values.astype(str)
        categories = old_values.value_counts()
        unseen = ~new_values.isin(categories.index)
        old_counts = np.append(categories.to_numpy(), 0)
        new_counts = np.append(new_values[~unseen].value_counts().reindex(categories.index, fill_value=0).to_numpy(), unseen.sum())
        figures["type"] = "categorical"
        figures["unseen"] = round(float(unseen.sum() / max(len(new), 1)), 4)
    # the missing values' bin
    old_counts, new_counts = np.append(old_counts, old_missing.sum()), np.append(new_counts, new_missing.sum())
    figures["psi"] = round(psi(old_counts / max(len(old), 1), new_counts / max(len(new), 1)), 4)
    return figures


def compare(old, new, skip=()) -> list[dict]:
    """Per-column drift of ``new`` rows against ``old`` rows, the largest PSI first.

    Columns in ``skip`` (a key, a timestamp), datetime columns (time moves on by design) and
    identifier columns (integers or text, every old value distinct) are left out: their new
    values are new by nature, so a large PSI there says nothing.
    """
    rows = []
    for column in old.columns:
        if column in skip or column not in new.columns or _identifier(old[column]):
            continue
        rows.append({"column": str(column), **column_drift(old[column], new[column])})
    return sorted(rows, key=lambda r: -r["psi"])


def _identifier(series) -> bool:
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(series):
        return True
    if pd.api.types.is_float_dtype(series) or pd.api.types.is_bool_dtype(series):
        return False
    values = series.dropna()
    return len(values) >= _MIN_ID_ROWS and values.nunique() == len(values)


def new_rows(old, rows):
    """The rows of ``rows`` that are not already among ``old`` (a query that reads the whole
    table again brings the old rows too; drift is about the others)."""
    from .common import row_hashes

    shared = [c for c in rows.columns if c in old.columns]
    seen = set(row_hashes(old, shared))
    return rows[~row_hashes(rows.reset_index(drop=True), shared).isin(seen).to_numpy()]


def report(old, rows, against: str, skip=()) -> dict | None:
    """The drift figures a version keeps in its manifest: ``rows`` (those not already among
    the ``old`` training rows of version ``against``) per column; None with no new row."""
    fresh = new_rows(old, rows)
    if fresh.empty:
        return None
    columns = compare(old, fresh, skip)
    return {"against": against, "new_rows": len(fresh), "columns": columns}


def summary_line(drift: dict | None, top: int = 3) -> str | None:
    """One line for a run's summary: the columns that moved most."""
    if not drift or not drift["columns"]:
        return None
    parts = []
    for c in drift["columns"][:top]:
        extra = [f"{c['unseen']:.0%} unseen"] if c.get("unseen") else []
        if c["new_nulls"] - c["old_nulls"] >= 0.05:
            extra.append(f"nulls {c['old_nulls']:.0%} -> {c['new_nulls']:.0%}")
        parts.append(f"{c['column']} {c['psi']:.2f}" + (f" ({', '.join(extra)})" if extra else ""))
    large = sum(c["psi"] > LARGE for c in drift["columns"])
    verdict = f"{large} column{'s' if large != 1 else ''} shifted a lot (PSI > {LARGE})" if large else "no large shift"
    return f"drift of the {drift['new_rows']} new rows against {drift['against']}'s rows, PSI by column: {', '.join(parts)}; {verdict}"


def attach(outcome, drift: dict | None) -> None:
    """Keep ``drift`` in the version's manifest and its line in the run's summary."""
    if drift is None:
        return
    outcome.info["drift"] = drift
    line = summary_line(drift)
    if line:
        outcome.notes.append(line)
