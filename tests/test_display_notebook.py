"""A saved notebook keeps the final state: a static summary, a bounded number of outputs; a
live kernel shows the widget panel while running, then the summary in its place, once."""

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
STOPPED = """
d = make_display({ui!r}, "%%finetune stopped")
d.phase("training")
d.step(3, 10, loss=2.0)
d.fail(KeyboardInterrupt())
"""
WIDGET = "application/vnd.jupyter.widget-view+json"


@pytest.mark.parametrize("ui", ["auto", "static"])
def test_saved_notebook_shows_static_summary(tmp_path, ui):
    messages = []
    nb = run_notebook(
        ["%load_ext nbcustom", RUN.format(ui=ui), "# raises\n%%retrain ../x --target y\nSELECT 1 AS y", STOPPED.format(ui=ui)],
        tmp_path / "store", ui=ui, messages=messages,
    )
    outputs = nb.cells[1].outputs
    assert len(outputs) <= 3  # progress (updated in place) + summary, not 300 lines
    assert {"text/html", "image/png", "text/plain"} <= mime_types(outputs)
    summary = [o for o in outputs if "image/png" in o.get("data", {})][-1]
    assert "exact_match" in summary["data"]["text/html"] and "+0.7" in summary["data"]["text/plain"]
    assert WIDGET not in mime_types(outputs)  # nothing in the saved notebook needs widget state
    if ui == "auto":
        # live: the panel was shown, then replaced in place by the summary: one output
        shown = [(kind, display_id, mimes) for cell, kind, display_id, mimes in messages if cell == 1 and kind != "status"]
        panel = [display_id for kind, display_id, mimes in shown if kind == "display_data" and WIDGET in mimes]
        assert len(panel) == 1 and [kind for kind, *_ in shown if kind == "display_data"] == ["display_data"]
        updates = [mimes for kind, display_id, mimes in shown if kind == "update_display_data" and display_id == panel[0]]
        assert updates == [{"text/html", "image/png", "text/plain"}]
        assert len(outputs) == 1 and outputs[0]["data"]["text/html"].count('class="nbc-metrics"') == 1
    else:
        progress = outputs[0]["data"]["text/plain"]
        assert "done" in progress and "300" in progress  # the handle holds the final state
    error = nb.cells[2].outputs
    assert len(error) == 1 and error[0]["ename"] == "NbCustomError"
    assert len(error[0]["traceback"]) == 1 and "invalid model name" in error[0]["traceback"][0]
    stopped = nb.cells[3].outputs
    assert len(stopped) == 1 and "stopped: KeyboardInterrupt" in stopped[0]["data"]["text/plain"]
