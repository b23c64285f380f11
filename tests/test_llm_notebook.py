"""A notebook with %%finetune, %%predict and %nbc show runs headless (nbclient); its saved
outputs keep the before/after table, the loss chart and the examples."""

from __future__ import annotations

import pytest

from notebooks import mime_types, outputs_of, run_notebook

CELLS = [
    "%load_ext nbcustom",
    "import sys; sys.path.insert(0, {tests!r})\nimport llm_task\nproducts = llm_task.rows(20)",
    '%%finetune fmt --max-steps 3 --lr 2e-3 --eval-frac 0.2 --max-new-tokens 12 --system "{system}"\n'
    "SELECT * FROM products",
    "%%predict fmt --max-new-tokens 12\nSELECT prompt FROM products LIMIT 2",
    "%nbc show fmt",
]


@pytest.mark.slow
def test_notebook_with_finetune_predict_and_show_runs_headless(tmp_path):
    from pathlib import Path

    import llm_task

    tests = str(Path(__file__).parent)
    cells = [c.format(tests=tests, system=llm_task.SYSTEM) for c in CELLS]
    nb = run_notebook(cells, tmp_path / "store", ui="static")

    errors = [o for cell in nb.cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors
    finetune = outputs_of(nb, 2)
    assert {"text/html", "image/png"} <= mime_types(finetune)
    html = " ".join(o.data.get("text/html", "") for o in finetune if o.output_type == "display_data")
    for text in ("base", "v1", "exact_match", "eval_loss", "rouge_l", "examples", "reference", "before", "after"):
        assert text in html, text
    assert html.count("<img") >= 2  # loss chart and before/after chart
    # no library warnings or progress bars in the cell
    assert not [o for o in finetune if o.output_type == "stream" and o.name == "stderr"]
    predicted = outputs_of(nb, 3)[-1].data["text/plain"]
    assert "prediction" in predicted and "|" in predicted
    shown = " ".join(str(o.get("data", {})) for o in outputs_of(nb, 4))
    assert "exact_match" in shown and "image/png" in mime_types(outputs_of(nb, 4))
