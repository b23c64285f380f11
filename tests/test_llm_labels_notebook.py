"""Acceptance of label tasks in a headless notebook (nbclient): %%finetune picks labels on a
keyword-learnable ticket set, every %%predict answer is a label, held-out accuracy rises to
at least 0.9, and macro-F1 and the confusion matrix are in the manifest and the saved notebook."""

from __future__ import annotations

import json

import pytest

from notebooks import mime_types, outputs_of, run_notebook

CELLS = [
    "%load_ext nbcustom",
    "import sys; sys.path.insert(0, {tests!r})\nimport label_task\ntickets = label_task.rows(300)\nfresh = label_task.rows(40, seed=9)",
    '%%finetune router --max-steps 30 --eval-every 10 --lr 1e-3 --eval-frac 0.1 --system "{system}"\nSELECT * FROM tickets',
    "%%predict router --into predicted\nSELECT prompt FROM fresh",
    "import duckdb\nprint(duckdb.sql('SELECT prediction, confidence FROM predicted').df().to_json(orient='records'))",
]


@pytest.mark.slow
def test_label_task_in_a_saved_notebook(tmp_path):
    from pathlib import Path

    import label_task
    from nbcustom import Store

    tests = str(Path(__file__).parent)
    nb = run_notebook([c.format(tests=tests, system=label_task.SYSTEM) for c in CELLS], tmp_path / "store", ui="static", timeout=3600,
                      worker="off")  # training in the kernel: no fork server preloading beside it (the worker: test_worker.py)
    errors = [o for cell in nb.cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors

    version = Store(tmp_path / "store").get("router")
    manifest = version.manifest
    assert manifest["llm"]["task"] == "labels" and manifest["llm"]["labels"] == label_task.LABELS
    assert manifest["llm"]["patience"] == 2  # a label task stops early by default
    before, after = manifest["metrics"]["before"], manifest["metrics"]["after"]
    assert set(after) == {"accuracy", "macro_f1", "eval_loss"}
    assert after["accuracy"] >= 0.9 and after["accuracy"] > before["accuracy"] and after["macro_f1"] > before["macro_f1"]
    confusion = manifest["label_metrics"]["after"]["confusion"]
    assert len(confusion) == 5 and sum(map(sum, confusion)) == manifest["counts"]["held_out"] == 30
    assert sum(confusion[i][i] for i in range(5)) / 30 == after["accuracy"]
    assert set(manifest["label_metrics"]["after"]["per_class"]) == set(label_task.LABELS)
    assert (version.path / "confusion.png").read_bytes()[:4] == b"\x89PNG"

    finetune = outputs_of(nb, 2)
    html = " ".join(o.data.get("text/html", "") for o in finetune if o.output_type == "display_data")
    for text in ("task: labels (auto)", "accuracy", "macro_f1", 'alt="confusion"', "per class", "precision after", "best at step"):
        assert text in html, text
    assert "image/png" in mime_types(finetune)

    predicted = json.loads(outputs_of(nb, 4)[-1].text)
    assert len(predicted) == 40 and {p["prediction"] for p in predicted} <= set(label_task.LABELS)
    assert all(0 < p["confidence"] <= 1 for p in predicted)
    fresh = label_task.rows(40, seed=9)
    assert sum(p["prediction"] == r for p, r in zip(predicted, fresh["response"])) / 40 >= 0.8
