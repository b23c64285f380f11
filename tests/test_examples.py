"""Every example notebook runs headless with small parameters (papermill, on nbclient), and
its saved outputs hold each magic's static summary: HTML table, PNG chart, text/plain."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def execute(name: str, parameters: dict, tmp_path, monkeypatch) -> nbformat.NotebookNode:
    import papermill

    monkeypatch.setenv("NBCUSTOM_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("NBCUSTOM_UI", "static")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NBCUSTOM_WORKER", "on")  # as a user's kernel: training in worker processes
    papermill.execute_notebook(
        str(EXAMPLES / name), str(tmp_path / name), parameters=parameters, kernel_name="python3",
        cwd=str(tmp_path), progress_bar=False, log_output=False,
    )
    nb = nbformat.read(tmp_path / name, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors[0]["evalue"] if errors else ""
    return nb


def cell(nb, starts: str, nth: int = 0):
    return [c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts)][nth]


def summary(c) -> dict:
    """The static summary output of a magic cell (the last display with a PNG)."""
    shown = [o.data for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert shown, f"no static summary in {c.source.splitlines()[0]!r}"
    assert {"text/html", "text/plain"} <= set(shown[-1])
    assert not [o for o in c.outputs if o.output_type == "stream" and o.name == "stderr"]  # no library noise
    assert len(c.outputs) <= 3
    return shown[-1]


def manifest(tmp_path, name: str, version: int) -> dict:
    return json.loads((tmp_path / "store" / name / f"v{version}" / "manifest.json").read_text())


def test_quickstart_through_papermill_with_changed_parameters(tmp_path, monkeypatch):
    params = {"N_PRODUCTS": 24, "FINETUNE_STEPS": 3, "N_HOUSES": 120, "TIME_LIMIT": 5}
    nb = execute("quickstart.ipynb", params, tmp_path, monkeypatch)
    injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert injected and "FINETUNE_STEPS = 3" in injected[0].source
    assert manifest(tmp_path, "product_line", 1)["counts"]["steps"] == 3
    assert manifest(tmp_path, "house_prices", 2)["counts"]["previous"] == 120
    assert "house_id" not in manifest(tmp_path, "house_prices", 1)["feature_importance"]  # --key is no feature
    for magic in ("%%finetune", "%%retrain", "%%rag handbook --eval"):
        html = summary(cell(nb, magic))["text/html"]
        assert "<table" in html and "delta" in html
    for nth, before, after in ((0, "baseline", "v1"), (1, "v1", "v2")):  # no AutoGluon log lines in either
        html = summary(cell(nb, "%%retrain house_prices", nth))["text/html"]
        assert before in html and after in html and "leaderboard" in html
    built = summary(cell(nb, "%%rag handbook --metadata"))["text/html"]
    assert "<table" in built and "unchanged" in built  # the refresh table and chart
    answers = cell(nb, "%%rag handbook --ask").outputs[-1].data
    assert "QF-7781" in answers["text/plain"] and "<th>snippet</th>" in answers["text/html"]
    assert "image/png" in answers and "data:image/png;base64," in answers["text/html"]  # the score chart
    assert "prediction" in cell(nb, "%%predict product_line").outputs[-1].data["text/plain"]
    assert "house_prices" in cell(nb, "%nbc list").outputs[-1].data["text/plain"]


def test_finetune_support_bot(tmp_path, monkeypatch):
    nb = execute("finetune_support_bot.ipynb", {"N_TICKETS": 40, "STEPS": 5, "MORE_STEPS": 2}, tmp_path, monkeypatch)
    first = summary(cell(nb, "%%finetune support_bot"))
    for text in ("base", "v1", "before", "after", "exact_match", "eval_loss", "rouge_l", "examples", "reference"):
        assert text in first["text/html"], text  # the before/after table and the held-out examples
    assert first["text/html"].count("<img") >= 2  # the loss chart and the before/after chart
    v1, v2 = manifest(tmp_path, "support_bot", 1), manifest(tmp_path, "support_bot", 2)
    assert v2["parent"] == 1 and set(v2["metrics"]["before"]) == set(v1["metrics"]["after"])
    assert "prediction" in cell(nb, "%%predict").outputs[-1].data["text/plain"]
    shown = cell(nb, "%nbc show").outputs[-1].data
    assert "support_bot@2" in shown["text/plain"] and "exact_match" in shown["text/plain"] and "image/png" in shown


def test_retrain_forecast(tmp_path, monkeypatch):
    nb = execute("retrain_forecast.ipynb", {"HISTORY_DAYS": 120, "NEW_DAYS": 30, "HORIZON": 7, "TIME_LIMIT": 10}, tmp_path, monkeypatch)
    for nth in (0, 1):
        html = summary(cell(nb, "%%retrain demand", nth))["text/html"]
        assert "forecast" in html and "delta" in html
    v2 = manifest(tmp_path, "demand", 2)
    assert v2["counts"]["previous"] == 120 and v2["counts"]["new"] == 30 and "forecast.png" in v2["files"]
    forecast = cell(nb, "%%predict demand").outputs[-1].data["text/plain"]
    assert "p10" in forecast and "p90" in forecast
    versions = cell(nb, "%nbc versions").outputs[-1].data["text/plain"]
    assert versions.count("ready") == 2
    assert "v1" in cell(nb, "%nbc compare").outputs[-1].data["text/plain"]


def test_rag_handbook(tmp_path, monkeypatch):
    nb = execute("rag_handbook.ipynb", {"TOP_K": 2}, tmp_path, monkeypatch)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream"]  # no library noise
    built = summary(cell(nb, "%%rag handbook --metadata"))["text/html"]
    assert "handbook -&gt; v1" in built and "added" in built and "embedded" in built
    answers = cell(nb, "%%rag handbook --ask").outputs[-1].data
    assert answers["text/html"].count("<b>Q:</b>") == 2  # both questions of the cell
    assert "leave-1" in answers["text/plain"] and "<th>snippet</th>" in answers["text/html"]
    assert "faithfulness" in answers["text/plain"] and "<th>score</th><th>vector</th><th>keyword</th>" in answers["text/html"]
    refreshed = manifest(tmp_path, "handbook", 2)["counts"]
    assert (refreshed["changed"], refreshed["added"], refreshed["removed"], refreshed["embedded"]) == (1, 0, 0, 1)
    evaluated = summary(cell(nb, "%%rag handbook --eval"))["text/html"]
    assert "LLM alone" in evaluated and "with retrieval (top 2, hybrid)" in evaluated and "faithfulness" in evaluated
    assert "answer_contains" in evaluated and "hit_rate@2" in evaluated and "mrr" in evaluated
    predicted = cell(nb, "%%predict handbook").outputs[-1]
    assert predicted.output_type == "execute_result"
    assert "prediction" in predicted.data["text/plain"] and "sources" in predicted.data["text/plain"]
