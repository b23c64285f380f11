"""A notebook with %%retrain twice, %%predict and %nbc versions runs headless (nbclient) and
its saved outputs keep the before/after table and the charts."""

from __future__ import annotations

import pytest

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
]


@pytest.mark.slow
def test_notebook_with_retrain_predict_and_versions_runs_headless(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("NBCUSTOM_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("NBCUSTOM_UI", "static")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS])
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "retrain.ipynb")

    outputs = [cell.outputs for cell in nb.cells]
    assert not [o for cell in outputs for o in cell if o.output_type == "error"]
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
