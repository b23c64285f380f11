"""One bad ``--precision bf16`` cell must not break the kernel (issue 26): on a CPU without
native bf16 (forced by patching the detection) the cell is one line, and when the bf16
set-up crashes half-way inside oneDNN (as it did on AVX2-only CPUs), the shared base model is
restored; ``%%predict`` and ``%%rag --ask`` in the same kernel work afterwards."""

from __future__ import annotations

import pytest

from notebooks import outputs_of, run_notebook

ONEDNN = "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq"
CELLS = [
    "%load_ext nbcustom",
    "import sys; sys.path.insert(0, {tests!r})\nimport llm_task, pandas as pd\ntiny = str(llm_task.tiny_base('tiny'))\n"
    "rows = llm_task.rows(12)\ndocs = pd.DataFrame({{'id': [1, 2], 'text': ['The office opens at 8.', 'Lunch is at noon.']}})",
    '%%finetune fmt --base {{tiny}} --max-steps 2 --eval-frac 0.25 --max-new-tokens 4\nSELECT * FROM rows',
    "%%rag docs --llm {{tiny}}\nSELECT * FROM docs",
    "from nbcustom.engines.llm import precision\nreal_frozen = precision._frozen\nprecision.cpu_features = lambda: precision.CPUFeatures((), False, 'AVX2')",
    "# raises\n%%finetune fmt --precision bf16 --max-steps 2\nSELECT * FROM rows",
    # a CPU that claims bf16, whose oneDNN fails after two layer groups were swapped in
    "precision.cpu_features = lambda: precision.CPUFeatures(('avx512_bf16',), True, 'AVX512')\npacked = []\n"
    "def crashing(weight, dtype, packed_=True):\n    packed.append(1)\n    if len(packed) > 2:\n        raise RuntimeError({onednn!r})\n"
    "    return weight.detach().to(dtype), weight.detach().to(dtype).t()\nprecision._frozen = crashing",
    "# raises\n%%finetune fmt --precision bf16 --max-steps 2\nSELECT * FROM rows",
    "precision._frozen = real_frozen\nprecision.cpu_features = lambda: precision.CPUFeatures((), False, 'AVX2')",  # the AVX2 CPU again
    "%%predict fmt --into predicted\nSELECT prompt FROM rows LIMIT 2",
    "import duckdb\npredicted = duckdb.sql('SELECT prediction FROM predicted').df()\nprint(len(predicted), predicted['prediction'].map(type).eq(str).all())",
    "%%rag docs --ask\nWhen does the office open?",
    "import torch\nfrom nbcustom import models\nprint('shared model', {{p.dtype for p in models.load_llm(models.resolve_llm(tiny))[0].parameters()}})",
]


@pytest.mark.slow
def test_a_bad_bf16_cell_leaves_predict_and_ask_working(tmp_path):
    from pathlib import Path

    nb = run_notebook([c.format(tests=str(Path(__file__).parent), onednn=ONEDNN) for c in CELLS], tmp_path / "store", ui="text", cwd=tmp_path, worker="off")
    errors = {i: o for i, cell in enumerate(nb.cells) for o in cell.outputs if o.output_type == "error"}
    assert sorted(errors) == [5, 7], errors
    assert "needs a CPU with amx_bf16 or avx512_bf16" in errors[5].evalue and "\n" not in errors[5].evalue
    assert "mkldnn_reorder_linear_weight" in errors[7].evalue
    assert outputs_of(nb, 10)[-1].text.strip() == "2 True"  # %%predict answered every row
    asked = " ".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs_of(nb, 11))
    assert "When does the office open?" in asked and "office" in asked.lower()
    assert outputs_of(nb, 12)[-1].text.strip() == "shared model {torch.float32}"
