"""Drift figures (PSI per column, unseen categories, nulls) on rows made here: no training."""

import numpy as np
import pandas as pd
import pytest

from nbcustom.engines.automl.drift import LARGE, compare, new_rows, psi, report, summary_line


def rows(n, seed, shift=0.0, cities=("oslo", "rome", "lima")):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "id": np.arange(n) + seed * 100_000,
        "income": rng.normal(50.0, 10.0, n) + shift * 10.0,
        "age": rng.integers(18, 80, n),
        "city": rng.choice(cities, n),
        "score": rng.normal(0.0, 1.0, n),
    })


def test_a_column_shifted_by_two_standard_deviations_has_the_largest_psi():
    old, new = rows(2000, 1), rows(500, 2, shift=2.0)
    figures = {c["column"]: c for c in compare(old, new)}
    ranked = [c["column"] for c in compare(old, new)]
    assert ranked[0] == "income" and figures["income"]["psi"] > LARGE
    for column in ("age", "city", "score"):
        assert figures[column]["psi"] < 0.1, (column, figures[column])
    # the id column (all distinct integers) is an identifier: its values are new by nature
    assert "id" not in figures
    # same distribution, other sample: every PSI small
    assert max(c["psi"] for c in compare(old, rows(500, 3))) < 0.1


def test_unseen_categories_and_nulls_are_counted():
    old = rows(1000, 1)
    new = rows(400, 2, cities=("oslo", "rome", "lima", "kyiv", "baku"))
    new.loc[:99, "score"] = None
    figures = {c["column"]: c for c in compare(old, new)}
    unseen = new["city"].isin(["kyiv", "baku"]).mean()
    assert figures["city"]["unseen"] == pytest.approx(unseen, abs=1e-4) and unseen > 0.3
    assert figures["city"]["psi"] > LARGE  # two fifths of the rows in a bin the old rows never had
    assert figures["score"]["old_nulls"] == 0 and figures["score"]["new_nulls"] == 0.25
    assert figures["score"]["type"] == "numeric" and figures["city"]["type"] == "categorical"


def test_psi_of_identical_shares_is_zero_and_grows_with_the_shift():
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0
    assert 0 < psi([0.5, 0.5], [0.6, 0.4]) < psi([0.5, 0.5], [0.9, 0.1])


def test_report_compares_only_rows_new_to_the_version():
    old, fresh = rows(300, 1), rows(60, 2, shift=2.0)
    everything = pd.concat([old, fresh], ignore_index=True)  # a query that reads the whole table again
    assert len(new_rows(old, everything)) == 60
    figures = report(old, everything, "v1", skip=["id"])
    assert figures["new_rows"] == 60 and figures["against"] == "v1"
    assert figures["columns"][0]["column"] == "income"
    line = summary_line(figures)
    assert line.startswith("drift of the 60 new rows against v1's rows, PSI by column: income ")
    assert "1 column shifted a lot" in line
    assert report(old, old, "v1") is None
