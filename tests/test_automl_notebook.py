"""A notebook with %%retrain twice, %%predict and %nbc versions runs headless (nbclient) and
its saved outputs keep the before/after table and the charts; a forecast with known
covariates is handed next weeks' plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from notebooks import run_notebook

CELLS = [
    "%load_ext nbcustom",
    "from sklearn.datasets import load_wine\n"
    "wine = load_wine(as_frame=True).frame\n"
    "wine.insert(0, 'id', range(len(wine)))\n"
    "wine['cultivar'] = wine.pop('target').map({0: 'a', 1: 'b', 2: 'c'})",
    "%%retrain wine --target cultivar --time-limit 10\nSELECT * FROM wine WHERE id % 3 <> 0",
    "%%retrain wine --time-limit 10\nSELECT * FROM wine",
    "%%predict wine\nSELECT * EXCLUDE (cultivar) FROM wine LIMIT 5",
    "%nbc versions wine",
    "import sys; sys.path.insert(0, {tests!r})\nimport sales_task\nweekly = sales_task.rows(stores=6, weeks=60)\nplan = sales_task.plan(weekly, 4)",
    "%%retrain sales --target units --timestamp week --item-id store --horizon 4 --known promo,price --time-limit 15\nSELECT * FROM weekly",
    "%%predict sales --into forecast\nSELECT store, week, promo, price FROM plan",
    "# raises\n%%predict sales\nSELECT store, week, promo FROM plan",
]


@pytest.mark.slow
def test_notebook_with_retrain_predict_and_versions_runs_headless(tmp_path):
    import nbformat

    tests = str(Path(__file__).parent)
    nb = run_notebook([c.replace("{tests!r}", repr(tests)) for c in CELLS], tmp_path / "store", timeout=600)
    nbformat.write(nb, tmp_path / "retrain.ipynb")

    outputs = [cell.outputs for cell in nb.cells]
    errors = {i: o for i, cell in enumerate(outputs) for o in cell if o.output_type == "error"}
    assert sorted(errors) == [9], errors
    for cell, before, after in ((2, "baseline", "v1"), (3, "v1", "v2")):
        html = " ".join(o.data.get("text/html", "") for o in outputs[cell] if o.output_type == "display_data")
        assert before in html and after in html and "accuracy" in html and "leaderboard" in html
        assert any("image/png" in o.get("data", {}) for o in outputs[cell])
        # no AutoGluon log lines in the cell
        assert not [o for o in outputs[cell] if o.output_type == "stream"]
    predicted = outputs[4][-1].data["text/plain"]
    assert "prediction" in predicted and "proba_a" in predicted
    versions = outputs[5][-1].data["text/plain"]
    assert "accuracy" in versions and "2" in versions

    # the forecast with known covariates: its roles in the summary, each planned row forecast
    html = " ".join(o.data.get("text/html", "") for o in outputs[7] if o.output_type == "display_data")
    assert "known covariates" in html and "static features (constant within every series): size" in html and "covariates" in html
    planned = outputs[8][-1].data["text/plain"]
    assert "p10" in planned and "p90" in planned and "s05" in planned
    assert "lack sales's known covariate price" in errors[9].evalue and "\n" not in errors[9].evalue
