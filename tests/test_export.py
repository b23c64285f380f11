"""%nbc export and `nbcustom export` for AutoML (deployment) and RAG (parquet) versions,
and the refusals: a format for another kind, a non-empty --to, a tampered version.
(LLM formats: test_llm_export.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from conftest import snapshot
from nbcustom import Store
from nbcustom.engines.automl.common import in_holdout
from nbcustom.engines.automl.deployment import size_mib
from nbcustom.errors import NbCustomError
from rag_facts import facts_frame
from test_automl import cancer_frame


def cli(store, *args):
    env = {**os.environ, "NBCUSTOM_STORE": str(store)}
    return subprocess.run([sys.executable, "-m", "nbcustom.cli", "export", *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def cancer(shell, tmp_path_factory):
    """``cancer`` v1: a tabular AutoGluon version on 300 rows."""
    store = tmp_path_factory.mktemp("export_automl") / "store"
    shell.run_line_magic("config", f"NbCustom.store = {str(store)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'none'")
    shell.user_ns["cancer_df"] = cancer_frame().head(300)
    shell.run_cell_magic("retrain", "cancer --target diagnosis --time-limit 15", "SELECT * FROM cancer_df")
    shell.user_ns.pop("cancer_df")
    return store


@pytest.fixture(scope="module")
def facts(shell, tmp_path_factory):
    """``facts`` v1: a RAG index of 30 rows with a metadata column."""
    store = tmp_path_factory.mktemp("export_rag") / "store"
    shell.run_line_magic("config", f"NbCustom.store = {str(store)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'none'")
    shell.user_ns["facts"] = facts_frame()
    shell.run_cell_magic("rag", "facts --metadata topic --chunk-size 64 --chunk-overlap 8", "SELECT * FROM facts")
    shell.user_ns.pop("facts")
    return store


def _use(shell, store):
    shell.run_line_magic("config", f"NbCustom.store = {str(store)!r}")


@pytest.mark.slow
def test_deployment_predicts_as_predict_on_the_holdout_and_is_smaller(shell, cancer, tmp_path, capsys):
    from autogluon.tabular import TabularPredictor

    _use(shell, cancer)
    version = Store(cancer).get("cancer")
    rows = pd.read_parquet(version.path / "train.parquet")
    holdout = rows[in_holdout(rows, 0.2)].drop(columns="diagnosis").reset_index(drop=True)
    shell.user_ns["holdout"] = holdout
    predicted = shell.run_cell_magic("predict", "cancer", "SELECT * FROM holdout")
    before = snapshot(cancer)
    capsys.readouterr()
    shell.run_line_magic("nbc", f"export cancer --format deployment --to {tmp_path / 'deploy'}")
    printed = capsys.readouterr().out
    assert snapshot(cancer) == before  # nothing written into the store
    deployed = TabularPredictor.load(str(tmp_path / "deploy"))
    assert deployed.predict(holdout).tolist() == predicted["prediction"].tolist()
    proba = deployed.predict_proba(holdout)
    for label in proba.columns:
        assert proba[label].to_numpy() == pytest.approx(predicted[f"proba_{label}"].to_numpy())
    exported, stored = size_mib(tmp_path / "deploy"), size_mib(version.model_dir / "predictor")
    print(f"deployment export: {exported:.2f} MiB, the version's predictor: {stored:.2f} MiB")
    assert exported < stored
    assert f"size: {exported:.1f} MiB (the version's predictor: {stored:.1f} MiB)" in printed


@pytest.mark.slow
def test_cli_deployment_with_refit_leaves_the_store_as_it_was(cancer, tmp_path):
    from autogluon.tabular import TabularPredictor

    before = snapshot(cancer)
    run = cli(cancer, "cancer@1", "--format", "deployment", "--refit", "--to", str(tmp_path / "refit"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refit on all rows" in run.stdout and "size:" in run.stdout
    assert snapshot(cancer) == before
    deployed = TabularPredictor.load(str(tmp_path / "refit"))
    assert deployed.model_best.endswith("_FULL")
    rows = pd.read_parquet(Store(cancer).get("cancer").path / "train.parquet").head(20)
    assert set(deployed.predict(rows.drop(columns="diagnosis"))) <= {"benign", "malignant"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left


def test_parquet_export_holds_rows_chunks_vectors_metadata_and_the_embedding_model(shell, facts, tmp_path):
    import duckdb
    import pyarrow.parquet as pq

    _use(shell, facts)
    before = snapshot(facts)
    shell.run_line_magic("nbc", f"export facts --format parquet --to {tmp_path / 'out'}")
    assert snapshot(facts) == before
    version = Store(facts).get("facts")
    table = pq.read_table(tmp_path / "out" / "facts-v1.parquet")
    about = json.loads(table.schema.metadata[b"nbcustom"])
    assert about["embed_model"] == "all-minilm-l6-v2" and about["dim"] == 384 and about["chunk_size"] == 64
    frame = table.to_pandas()
    assert len(frame) == version.manifest["counts"]["chunks"]
    assert set(frame["row_id"]) == {str(i) for i in facts_frame()["id"]}
    con = duckdb.connect(str(version.model_dir / "index.duckdb"), read_only=True)
    index = con.sql("SELECT chunk_id, text, metadata, embedding FROM chunks ORDER BY chunk_id").df()
    con.close()
    frame = frame.sort_values("chunk_id").reset_index(drop=True)
    assert frame["text"].tolist() == index["text"].tolist() and frame["metadata"].tolist() == index["metadata"].tolist()
    assert all((a == b).all() for a, b in zip(frame["embedding"], index["embedding"]))
    first = frame[frame["row_id"] == "1"].iloc[0]
    assert first["row"]["fact"] == facts_frame().set_index("id").loc[1, "fact"] and first["row"]["topic"] == "security"


# --- refusals: one line, nothing written -----------------------------------------------
@pytest.mark.parametrize(
    "options, message",
    [
        ("--format gguf", "--format gguf is for llm models and facts is rag: use --format parquet"),
        ("--format deployment", "use --format parquet"),
        ("--format onnx", "--format must be one of merged, gguf, ollama, vllm, deployment, parquet"),
        ("--format parquet --quant q4", "--quant must be one of f16, q8_0"),
        ("", "--format is required"),
    ],
)
def test_bad_format_is_one_line_and_writes_nothing(shell, facts, tmp_path, options, message):
    _use(shell, facts)
    before = snapshot(facts)
    target = tmp_path / "out" / "nested"
    with pytest.raises(NbCustomError) as error:
        shell.run_line_magic("nbc", f"export facts {options} --to {target}")
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert snapshot(facts) == before


def test_existing_non_empty_folder_or_one_in_the_store_is_refused(shell, facts, tmp_path):
    _use(shell, facts)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    before = snapshot(facts)
    with pytest.raises(NbCustomError, match="already exists and is not empty"):
        shell.run_line_magic("nbc", f"export facts --format parquet --to {tmp_path / 'taken'}")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    with pytest.raises(NbCustomError, match="inside the store"):
        shell.run_line_magic("nbc", f"export facts --format parquet --to {facts / 'exports'}")
    assert snapshot(facts) == before
    (tmp_path / "empty").mkdir()  # an existing empty folder is fine
    shell.run_line_magic("nbc", f"export facts --format parquet --to {tmp_path / 'empty'}")
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["facts-v1.parquet"]


def test_tampered_version_is_refused_by_magic_and_cli(shell, facts, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(facts, store)
    index = store / "facts" / "v1" / "model" / "index.duckdb"
    index.write_bytes(index.read_bytes()[:-1] + b"\x01")
    _use(shell, store)
    before = snapshot(store)
    with pytest.raises(NbCustomError, match="facts@1: file model/index.duckdb failed its sha256 checksum"):
        shell.run_line_magic("nbc", f"export facts --format parquet --to {tmp_path / 'out'}")
    run = cli(store, "facts@1", "--format", "parquet", "--to", str(tmp_path / "out"))
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "failed its sha256 checksum" in run.stderr
    assert not (tmp_path / "out").exists() and snapshot(store) == before
