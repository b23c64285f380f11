"""Kernel settings reach the Python API: in a kernel where ``%load_ext nbcustom`` ran, every
``nbcustom.*`` call uses the kernel's ``NbCustom`` store, database and ui unless it passes
its own, and its SQL sees the notebook's DataFrames; elsewhere the environment variables
and defaults apply."""

from __future__ import annotations

import subprocess
import sys

import pytest

import llm_task
import nbcustom
from nbcustom.store import Store
from notebooks import run_notebook
from rag_facts import FACTS, QUESTIONS

HOUSES = (
    "import numpy as np, pandas as pd\n"
    "rng = np.random.default_rng(0)\n"
    "houses = pd.DataFrame({'rooms': rng.integers(1, 6, 120), 'area': rng.normal(80, 20, 120)})\n"
    "houses['price'] = 50 * houses.rooms + 2 * houses.area + rng.normal(0, 10, 120)\n"
)


@pytest.mark.slow
def test_magics_and_the_api_share_the_kernels_store_in_a_notebook(tmp_path):
    kernel_store = tmp_path / "kernel_store"
    nb = run_notebook(
        [
            "%load_ext nbcustom",
            f"%config NbCustom.store = {str(kernel_store)!r}",
            HOUSES + f"facts = pd.DataFrame({FACTS[:8]!r}, columns=['id', 'fact', 'topic'])",
            "%%retrain houses --target price --time-limit 8\nSELECT * FROM houses",
            "%%rag facts --max-new-tokens 16\nSELECT * FROM facts",
            "import nbcustom\n"
            "predicted = nbcustom.predict('houses', 'SELECT rooms, area FROM houses LIMIT 3')\n"
            "model = nbcustom.load('houses')\n"
            "answers = nbcustom.ask('facts', 'What is the access code of the Vormund vault?')\n"
            "print(len(predicted), predicted['prediction'].notna().all(), model.version.path)\n"
            "print(answers['sources'][0][0]['id'])",
        ],
        tmp_path / "env_store", ui="static", worker="off",  # in the kernel: see test_worker.py
    )
    errors = [o for cell in nb.cells for o in cell.outputs if o.output_type == "error"]
    assert not errors, errors[0]["traceback"][-1] if errors else ""
    printed = "".join(o.get("text", "") for o in nb.cells[5].outputs).split("\n")
    assert printed[:2] == [f"3 True {kernel_store / 'houses' / 'v1'}", "1"]
    assert not (tmp_path / "env_store").exists()  # NBCUSTOM_STORE of the kernel's environment unused


@pytest.mark.slow
def test_every_api_function_uses_the_kernels_settings(ip, store_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NBCUSTOM_STORE", str(tmp_path / "env_store"))
    monkeypatch.setenv("NBCUSTOM_UI", "none")
    ip.run_line_magic("config", f"NbCustom.database = {str(tmp_path / 'shop.duckdb')!r}")
    con = nbcustom.connection()  # the kernel's database, the file
    ip.run_cell(HOUSES)
    for table, frame in (("houses", ip.user_ns["houses"]), ("tickets", llm_task.rows(12))):
        con.register("frame", frame)
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM frame")
        con.unregister("frame")
    con.execute("CREATE TABLE facts (id INTEGER, fact VARCHAR, topic VARCHAR)")
    con.executemany("INSERT INTO facts VALUES (?, ?, ?)", FACTS[:8])
    con.execute("CREATE TABLE questions (question VARCHAR, answer VARCHAR, source_id INTEGER)")
    con.executemany("INSERT INTO questions VALUES (?, ?, ?)", QUESTIONS[:2])
    capsys.readouterr()

    nbcustom.retrain("houses", "SELECT * FROM houses", target="price", time_limit=5)
    assert "%%retrain houses: checking rows" in capsys.readouterr().out  # the kernel's ui = 'text'
    nbcustom.finetune("bot", "SELECT * FROM tickets", max_steps=1, eval_frac=0.25, max_new_tokens=4)
    nbcustom.rag("facts", "SELECT * FROM facts", max_new_tokens=8)
    evaluated = nbcustom.rag_eval("facts", "SELECT * FROM questions")
    assert evaluated.path.parent.parent == store_dir and "mrr" in evaluated.manifest["metrics"]["after"]
    ip.user_ns["new_houses"] = ip.user_ns["houses"].head(2)  # a notebook DataFrame, named in the API's SQL
    assert len(nbcustom.predict("houses", "SELECT rooms, area FROM new_houses")) == 2
    assert nbcustom.load("bot").version.path == store_dir / "bot" / "v1"
    assert nbcustom.ask("facts", "What is the access code of the Vormund vault?")["sources"][0]
    assert [m["name"] for m in Store(store_dir).models()] == ["bot", "facts", "houses"]
    assert not (tmp_path / "env_store").exists()
    other = tmp_path / "other"  # a call's own store= still wins
    nbcustom.retrain("houses", "SELECT * FROM houses", target="price", time_limit=5, store=other, ui="none")
    assert Store(other).active_version("houses") == 1 and Store(store_dir).active_version("houses") == 1


@pytest.mark.slow
def test_outside_a_kernel_the_environment_applies(tmp_path):
    code = (
        "import nbcustom.api as api; print(api.default_store(), api.default_ui())\n"
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "ip = InteractiveShell.instance(); ip.run_line_magic('load_ext', 'nbcustom')\n"
        "ip.run_line_magic('config', \"NbCustom.store = 'from_kernel'\"); print(api.default_store(), api.default_ui())"
    )
    env = {"NBCUSTOM_STORE": str(tmp_path / "env_store"), "NBCUSTOM_UI": "text", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert out[:2] == [f"{tmp_path / 'env_store'} text", "from_kernel text"]
