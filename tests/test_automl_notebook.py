"""A forecast with known covariates in a headless notebook (nbclient): the summary names each
column's role, ``%%predict`` is handed next weeks' plan, and a plan without a covariate is
one line. (%%retrain twice, %%predict and %nbc versions in a notebook: tests/test_examples.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from notebooks import run_notebook

CELLS = [
    "%load_ext nbcustom",
    "import sys; sys.path.insert(0, {tests!r})\nimport sales_task\nweekly = sales_task.rows(stores=6, weeks=60)\nplan = sales_task.plan(weekly, 4)",
    "%%retrain sales --target units --timestamp week --item-id store --horizon 4 --known promo,price --time-limit 15\nSELECT * FROM weekly",
    "%%predict sales --into forecast\nSELECT store, week, promo, price FROM plan",
    "# raises\n%%predict sales\nSELECT store, week, promo FROM plan",
]


@pytest.mark.slow
def test_forecast_with_known_covariates_is_handed_the_plan_in_a_notebook(tmp_path):
    tests = str(Path(__file__).parent)
    nb = run_notebook([c.replace("{tests!r}", repr(tests)) for c in CELLS], tmp_path / "store", timeout=600, worker="off")  # in the kernel: see test_worker.py
    outputs = [cell.outputs for cell in nb.cells]
    errors = {i: o for i, cell in enumerate(outputs) for o in cell if o.output_type == "error"}
    assert sorted(errors) == [4], errors
    html = " ".join(o.data.get("text/html", "") for o in outputs[2] if o.output_type == "display_data")
    assert "known covariates" in html and "static features (constant within every series): size" in html and "covariates" in html
    assert any("image/png" in o.get("data", {}) for o in outputs[2])
    assert not [o for o in outputs[2] if o.output_type == "stream"]  # no AutoGluon log lines in the cell
    planned = outputs[3][-1].data["text/plain"]
    assert "p10" in planned and "p90" in planned and "s05" in planned
    assert "lack sales's known covariate price" in errors[4].evalue and "\n" not in errors[4].evalue
