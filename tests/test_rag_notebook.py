"""A notebook with %%rag, %%rag --ask, %%rag --eval and %%predict runs headless (nbclient) and
its saved outputs show the answers with their sources and the before/after table."""

from __future__ import annotations

import pytest

from notebooks import mime_types, run_notebook
from rag_facts import FACTS, QUESTIONS

CELLS = [
    "%load_ext nbcustom",
    "import pandas as pd\n"
    f"facts = pd.DataFrame({FACTS!r}, columns=['id', 'fact', 'topic'])\n"
    f"questions = pd.DataFrame({QUESTIONS[:4]!r}, columns=['question', 'answer', 'source_id'])",
    "%%rag facts --metadata topic --top-k 3 --max-new-tokens 24\nSELECT * FROM facts",
    "%%rag facts --ask\nWhat is the access code of the Vormund vault?\nWho is the mayor of Quenville?",
    "%%rag facts --eval\nSELECT * FROM questions",
    "%%predict facts\nSELECT question FROM questions LIMIT 2",
]


@pytest.mark.slow
def test_notebook_with_rag_ask_eval_and_predict_runs_headless(tmp_path):
    import nbformat

    nb = run_notebook(CELLS, tmp_path / "store", ui="static")
    nbformat.write(nb, tmp_path / "rag.ipynb")
    outputs = [cell.outputs for cell in nb.cells]
    assert not [o for cell in outputs for o in cell if o.output_type == "error"]
    # no library noise (progress bars, warnings) in the saved cells
    assert not [o for cell in outputs[2:] for o in cell if o.output_type == "stream"]

    built = " ".join(o.data.get("text/html", "") for o in outputs[2] if "data" in o)
    assert "facts -&gt; v1" in built and "added" in built and "embedded" in built

    answers = outputs[3][-1].data
    assert {"text/html", "text/plain"} <= set(answers)
    assert answers["text/html"].count("<b>Q:</b>") == 2 and "<th>snippet</th>" in answers["text/html"]
    assert "Talia Brennick is the mayor" in answers["text/html"]  # a source of the second answer
    assert "QX-4471" in answers["text/plain"]

    evaluated = " ".join(o.data.get("text/html", "") for o in outputs[4] if "data" in o)
    assert "LLM alone" in evaluated and "with retrieval (top 3, hybrid)" in evaluated
    assert "answer_contains" in evaluated and "hit_rate@3" in evaluated and "mrr" in evaluated
    assert "image/png" in mime_types(outputs[4])

    predicted = outputs[5][-1]
    assert predicted.output_type == "execute_result"
    assert "prediction" in predicted.data["text/plain"] and "sources" in predicted.data["text/plain"]
