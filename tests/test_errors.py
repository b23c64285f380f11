"""User mistakes: one short NbCustomError line, no traceback, an unchanged store."""

import pytest

from conftest import snapshot
from nbcustom.errors import NbCustomError
from nbcustom.store import Store
from test_store import save

CASES = {
    "bad SQL": ("%%finetune bot\nSELEC prompt FROM nowhere", "SQL error"),
    "missing table": ("%%retrain m --target y\nSELECT * FROM no_such_table", "SQL error"),
    "unknown model": ("%%predict nope\nSELECT 'hi' AS prompt", "unknown model 'nope'"),
    "unknown model (show)": ("%nbc show nope", "unknown model 'nope'"),
    "unknown version": ("%nbc show m@9", "m has no version 9"),
    "unknown version (predict)": ("%%predict m --version 9\nSELECT 1 AS x", "m has no version 9"),
    "unknown option": ("%%retrain m --target y --bogus 1\nSELECT 1 AS y", "unrecognized arguments: --bogus"),
    "bad option value": ("%%finetune bot --epochs many\nSELECT 1", "invalid float value"),
    "out of range option": ("%%finetune bot --eval-frac 2\nSELECT 'a' AS prompt, 'b' AS response", "between 0 and 1"),
    "bad choice": ("%%finetune bot --device tpu\nSELECT 1", "must be one of auto, cpu, cuda"),
    "missing target": ("%%retrain m2\nSELECT 1 AS y", "--target COL is required"),
    "bad name": ("%%retrain ../x --target y\nSELECT 1 AS y", "invalid model name"),
    "no rows": ("%%retrain m2 --target y\nSELECT 1 AS y WHERE false", "returned no rows"),
    "unknown nbc command": ("%nbc explode m", "unknown %nbc command"),
    "wrong kind": ("%%rag m\nSELECT 1 AS id, 'x' AS text", "not a RAG index"),
}


@pytest.mark.parametrize("cell, message", CASES.values(), ids=CASES.keys())
def test_mistake_is_one_line_and_store_unchanged(ip, store_dir, capsys, cell, message):
    save(Store(store_dir))
    before = snapshot(store_dir)
    capsys.readouterr()
    with pytest.raises(NbCustomError, match=message.replace("(", r"\(").replace("-", r"\-")) as info:
        ip.run_cell(cell)
    shown = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(shown) == 1 and "NbCustomError" in shown[0]  # no traceback
    assert "\n" not in str(info.value)
    assert snapshot(store_dir) == before


def test_render_traceback_is_one_line():
    assert NbCustomError("do this")._render_traceback_() == ["\x1b[0;31mNbCustomError\x1b[0m: do this"]
