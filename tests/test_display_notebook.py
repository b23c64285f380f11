"""A saved notebook keeps the final state: a static summary, a bounded number of outputs."""

import pytest

from notebooks import mime_types, run_notebook

RUN = """
from nbcustom.display import make_display, Summary
d = make_display({ui!r}, "%%finetune demo")
d.phase("training")
for i in range(1, 301):
    d.step(i, 300, loss=3.0 / i)
d.log("epoch 1: eval_loss 0.5")
d.finish(Summary("%%finetune demo -> v1", {{"exact_match": 0.1}}, {{"exact_match": 0.8}}, charts={{"loss": d.loss_chart()}}))
"""


@pytest.mark.parametrize("ui", ["auto", "static"])
def test_saved_notebook_shows_static_summary(tmp_path, ui):
    nb = run_notebook(
        ["%load_ext nbcustom", RUN.format(ui=ui), "# raises\n%%retrain ../x --target y\nSELECT 1 AS y"],
        tmp_path / "store", ui=ui,
    )
    outputs = nb.cells[1].outputs
    assert len(outputs) <= 3  # progress (updated in place) + summary, not 300 lines
    assert {"text/html", "image/png", "text/plain"} <= mime_types(outputs)
    summary = [o for o in outputs if "image/png" in o.get("data", {})][-1]
    assert "exact_match" in summary["data"]["text/html"] and "+0.7" in summary["data"]["text/plain"]
    if ui == "auto":  # a live kernel gets the widget panel
        assert "application/vnd.jupyter.widget-view+json" in mime_types(outputs)
    else:
        progress = outputs[0]["data"]["text/plain"]
        assert "done" in progress and "300" in progress  # the handle holds the final state
    error = nb.cells[2].outputs
    assert len(error) == 1 and error[0]["ename"] == "NbCustomError"
    assert len(error[0]["traceback"]) == 1 and "invalid model name" in error[0]["traceback"][0]
