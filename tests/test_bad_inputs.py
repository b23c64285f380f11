"""Every bad input, one line (issue 27, point 4).

One table of mistakes over every flag of every magic and every ``%nbc`` command: wrong
types, out-of-range values, bad choices, missing columns, empty or all-NULL columns,
duplicate ids, a model of the wrong kind, an unknown version, an unreachable server. Each
must raise one ``NbCustomError`` line that says what to do, before any model is trained or
loaded, leave the store as it was, and never show a password.

The models the cases need are fake versions committed through the store API once per
module (no training); each test works on its own copy of that store.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

import pandas as pd
import pytest

from conftest import snapshot
from nbcustom.errors import NbCustomError
from nbcustom.store import Store

SECRET = "s3cret"
MAX_LENGTH = 300  # the longest line: %nbc's full usage (about 260 characters) fits
# what makes a line say what to do: an imperative, or what is needed
INSTRUCTION = re.compile(
    r"%config|\b(use|add|choose|remove|give|see|raise|lower|rename|check|select|filter|name|pass|start|fix|drop|"
    r"aggregate|bucket|cast|define|write|set|try|grant|leave|retrain|refresh|export|empty|run|schedule|"
    r"must|needs?|required)\b",
    re.IGNORECASE,
)


# --- the rows every case reads ------------------------------------------------------------
def _rows(n: int = 30) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "x": range(n),
            "y": [i % 2 for i in range(n)],
            "z": [("a", "b", "c")[i % 3] for i in range(n)],
            "prompt": [f"question {i}?" for i in range(n)],
            "response": [f"answer {i}" for i in range(n)],
            "id": range(1, n + 1),
            "text": [f"fact number {i} about things" for i in range(n)],
            "ts": pd.date_range("2024-01-01", periods=n, freq="D"),
            "v": [float(i % 7) for i in range(n)],
            "question": [f"what is fact {i}?" for i in range(n)],
            "answer": [f"fact {i}" for i in range(n)],
        }
    )


ROWS = _rows()
LLM = "SELECT prompt, response FROM rows"
TAB = "SELECT x, y, z FROM rows"
TS = "SELECT ts, v AS y FROM rows"
RAG = "SELECT id, text FROM rows"
QA = "SELECT question, answer FROM rows"
PAIRS = "SELECT prompt, response AS chosen, text AS rejected FROM rows"
PG = f"postgresql://nbc:{SECRET}@127.0.0.1:1/db"  # nothing listens on port 1


# --- the prepared store: fake versions, no training -----------------------------------------
def _version(store: Store, name: str, kind: str, manifest: dict, train: pd.DataFrame | None = None, model=None) -> None:
    with store.build(name, kind) as build:
        (model or (lambda folder: (folder / "weights.bin").write_bytes(b"fake")))(build.model_dir)
        if train is not None:
            train.to_parquet(build.path / "train.parquet", index=False)
        build.manifest.update({"metrics": {"before": {"acc": 0.5}, "after": {"acc": 0.75}}, "counts": {"read": 30, "trained": 24}, **manifest})


def _index(folder) -> None:
    """A real (tiny) DuckDB index file, so a RAG version opens without any model."""
    import numpy as np

    from nbcustom.engines.rag.stores import duckdb as vectors

    con = vectors.create(folder / vectors.FILE, 4)
    chunks = [{"chunk_id": f"{i}#0", "row_id": str(i), "position": 0, "hash": f"h{i}", "text": f"fact {i}", "metadata": {}} for i in (1, 2)]
    vectors.insert(con, chunks, np.eye(2, 4, dtype=np.float32))
    vectors.close(con)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared") / "store"
    store = Store(root)
    tabular = {
        "magic": "retrain", "sql": TAB, "task": "tabular", "target": "y", "schema": {"target": "y", "key": None},
        "options": {"target": "y", "time_limit": 60, "eval_frac": 0.2}, "time_limit": 60,
    }
    for _ in range(2):  # tab@1, tab@2 (active)
        _version(store, "tab", "automl", tabular, train=ROWS[["x", "y", "z"]])
    _version(store, "ts", "automl", {
        "magic": "retrain", "sql": TS, "task": "timeseries", "target": "y",
        "schema": {"target": "y", "timestamp": "ts", "item_id": None, "horizon": 3, "key": None},
        "options": {"target": "y", "timestamp": "ts", "horizon": 3},
    }, train=ROWS[["ts", "v"]].rename(columns={"v": "y"}))
    _version(store, "bot", "llm", {
        "magic": "finetune", "sql": LLM, "base": {"name": "smollm2-135m-instruct"},
        "llm": {"prompt": "prompt", "response": "response", "system": None, "task": "text", "labels": None},
    })
    rag_options = {"id": "id", "top_k": 4, "search": "hybrid", "chunk_size": 512, "chunk_overlap": 64}
    _version(store, "kb", "rag", {
        "magic": "rag", "sql": RAG, "options": rag_options,
        "index": {"id_column": "id", "id_type": "int", "text_columns": ["text"], "metadata_columns": [], "dim": 4,
                  "store": {"backend": "duckdb", "file": "model/index.duckdb"}},
    }, train=ROWS[["id", "text"]], model=_index)
    _version(store, "kbpg", "rag", {  # its vectors on a PostgreSQL server that is gone
        "magic": "rag", "sql": RAG, "options": rag_options,
        "index": {"id_column": "id", "id_type": "int", "text_columns": ["text"], "metadata_columns": [], "dim": 4,
                  "store": {"backend": "pgvector", "url": "postgresql://nbc@127.0.0.1:1/db", "host": "127.0.0.1", "port": 1,
                            "database": "db", "user": "nbc", "schema": "public", "table": "data_nbcustom_kbpg_0", "dim": 4}},
    })
    return root


# --- the table ---------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    magic: str  # finetune, retrain, rag, predict or nbc
    line: str
    body: str = ""
    match: str = ""  # a part of the expected message
    xfail: str = ""  # a known gap, fixed outside the files this test's author may change


CASES = [
    # %%finetune: options
    Case("finetune --epochs 0", "finetune", "newbot --epochs 0", LLM, "--epochs must be positive"),
    Case("finetune --epochs many", "finetune", "newbot --epochs many", LLM, "invalid float value"),
    Case("finetune --lr -1", "finetune", "newbot --lr -1", LLM, "--lr must be positive"),
    Case("finetune --max-steps 0", "finetune", "newbot --max-steps 0", LLM, "--max-steps must be positive"),
    Case("finetune --batch-size 0", "finetune", "newbot --batch-size 0", LLM, "--batch-size must be positive"),
    Case("finetune --batch-size 1.5", "finetune", "newbot --batch-size 1.5", LLM, "invalid int value"),
    Case("finetune --max-length 0", "finetune", "newbot --max-length 0", LLM, "--max-length must be positive"),
    Case("finetune --lora-r 0", "finetune", "newbot --lora-r 0", LLM, "--lora-r must be positive"),
    Case("finetune --lora-alpha -8", "finetune", "newbot --lora-alpha -8", LLM, "--lora-alpha must be positive"),
    Case("finetune --eval-frac 1", "finetune", "newbot --eval-frac 1", LLM, "between 0 and 1"),
    Case("finetune --eval-frac 0", "finetune", "newbot --eval-frac 0", LLM, "between 0 and 1"),
    Case("finetune --seed x", "finetune", "newbot --seed x", LLM, "invalid int value"),
    Case("finetune --device tpu", "finetune", "newbot --device tpu", LLM, "must be one of auto, cpu, cuda"),
    Case("finetune --precision fp16", "finetune", "newbot --precision fp16", LLM, "must be one of auto, fp32, bf16"),
    Case("finetune --task classify", "finetune", "newbot --task classify", LLM, "--task must be one of"),
    Case("finetune --keep worst", "finetune", "newbot --keep worst", LLM, "--keep must be one of"),
    Case("finetune --promote sometimes", "finetune", "newbot --promote sometimes", LLM, "--promote must be one of"),
    Case("finetune --patience -1", "finetune", "newbot --patience -1", LLM, "--patience must be 0"),
    Case("finetune --eval-every 0", "finetune", "newbot --eval-every 0", LLM, "--eval-every must be positive"),
    Case("finetune --max-new-tokens 0", "finetune", "newbot --max-new-tokens 0", LLM, "--max-new-tokens must be positive"),
    Case("finetune --devices 0", "finetune", "newbot --devices 0", LLM, "--devices must be positive"),
    Case("finetune --time-limit 0", "finetune", "tab --time-limit 0", TAB, "--time-limit must be positive"),
    Case("finetune --from 0", "finetune", "bot --from 0", LLM, "--from must be positive"),
    Case("finetune --from 9 (unknown version)", "finetune", "bot --from 9", LLM, "bot has no version 9"),
    Case("finetune --bogus", "finetune", "newbot --bogus 1", LLM, "unrecognized arguments: --bogus"),
    Case("finetune quote", "finetune", "newbot --system 'open", LLM, "check the quotes"),
    Case("finetune bad name", "finetune", "9bot", LLM, "invalid model name"),
    Case("finetune --base unknown", "finetune", "newbot --base no/such-model", LLM, "unknown base model"),
    # %%finetune: rows
    Case("finetune --prompt missing column", "finetune", "newbot --prompt nope", LLM, "no column 'nope'"),
    Case("finetune response all NULL", "finetune", "newbot", "SELECT prompt, NULL::VARCHAR AS response FROM rows", "NULL or empty 'response'"),
    Case("finetune prompt empty", "finetune", "newbot", "SELECT '  ' AS prompt, response FROM rows", "NULL or empty 'prompt'"),
    Case("finetune --max-length too small", "finetune", "newbot --max-length 2", LLM, "raise --max-length"),
    Case("finetune --task labels on free text", "finetune", "newbot --task labels",
         "SELECT prompt, prompt || ' and then a rather long answer number ' || x AS response FROM rows", "use --task text"),
    Case("finetune too few rows", "finetune", "newbot", LLM + " LIMIT 2", "at least 4"),
    Case("finetune no rows", "finetune", "newbot", LLM + " WHERE false", "returned no rows"),
    Case("finetune bad SQL", "finetune", "newbot", "SELEC prompt FROM rows", "SQL error"),
    Case("finetune two statements", "finetune", "newbot", "SELECT 1; SELECT 2", "one SELECT query"),
    Case("finetune undefined {{var}}", "finetune", "newbot", "SELECT * FROM rows WHERE x > {{limit}}", "define limit first"),
    Case("finetune --con unknown", "finetune", "newbot --con nocon", LLM, "no such variable"),
    Case("finetune a RAG index", "finetune", "kb", LLM, "refresh it with %%rag kb"),
    Case("finetune AutoML: target column missing", "finetune", "tab", "SELECT x, z FROM rows", "target column y"),
    Case("finetune AutoML: target all NULL", "finetune", "tab", "SELECT x, z, NULL::INTEGER AS y FROM rows", "NULL in all 30 rows"),
    Case("finetune AutoML: too few rows", "finetune", "tab", TAB + " LIMIT 5", "add rows"),
    Case("finetune time series: timestamp missing", "finetune", "ts", "SELECT v AS y FROM rows", "timestamp column ts"),
    # %%finetune --method dpo|kto: options and rows
    Case("finetune --method ppo", "finetune", "newbot --method ppo", LLM, "--method must be one of"),
    Case("finetune --beta 0", "finetune", "newbot --beta 0", PAIRS, "--beta must be positive"),
    Case("finetune dpo: no rejected column", "finetune", "newbot --method dpo", "SELECT prompt, response AS chosen FROM rows", "no column 'rejected'"),
    Case("finetune dpo: chosen equals rejected", "finetune", "newbot", "SELECT prompt, response AS chosen, response AS rejected FROM rows",
         "30 row(s) have the same 'chosen' and 'rejected'"),
    Case("finetune dpo: empty rejected", "finetune", "newbot",
         "SELECT prompt, response AS chosen, CASE WHEN x < 3 THEN '' ELSE text END AS rejected FROM rows", "3 row(s) have a NULL or empty 'rejected'"),
    Case("finetune dpo: prompt longer than --max-length", "finetune", "newbot --max-length 20", PAIRS, "30 row(s) have a prompt of --max-length 20"),
    Case("finetune kto without --feedback", "finetune", "newbot --method kto", LLM, "needs --feedback COL"),
    Case("finetune kto: --feedback missing column", "finetune", "newbot --feedback nope", LLM, "no column 'nope'"),
    Case("finetune kto: feedback all true", "finetune", "newbot --feedback good", "SELECT prompt, response, true AS good FROM rows", "all 30 rows have good = true"),
    Case("finetune kto: feedback not boolean", "finetune", "newbot --feedback good", "SELECT prompt, response, z AS good FROM rows", "must be a boolean column"),
    Case("finetune kto: feedback NULL", "finetune", "newbot --feedback good",
         "SELECT prompt, response, CASE WHEN x < 2 THEN NULL ELSE y = 1 END AS good FROM rows", "2 row(s) have a NULL 'good'"),
    Case("finetune dpo on an AutoML model", "finetune", "tab --method dpo", TAB, "--method dpo is for LLMs"),
    # %%retrain: options
    Case("retrain no --target", "retrain", "m", TAB, "--target COL is required"),
    Case("retrain --time-limit 0", "retrain", "m --target y --time-limit 0", TAB, "--time-limit must be positive"),
    Case("retrain --time-limit abc", "retrain", "m --target y --time-limit abc", TAB, "invalid int value"),
    Case("retrain --eval-frac 0", "retrain", "m --target y --eval-frac 0", TAB, "between 0 and 1"),
    Case("retrain --eval-frac 1.5", "retrain", "m --target y --eval-frac 1.5", TAB, "between 0 and 1"),
    Case("retrain --promote maybe", "retrain", "m --target y --promote maybe", TAB, "--promote must be one of"),
    Case("retrain --seed 1.5", "retrain", "m --target y --seed 1.5", TAB, "invalid int value"),
    Case("retrain --presets bogus", "retrain", "m --target y --presets bogus", TAB, "--presets bogus"),
    Case("retrain --metric bogus", "retrain", "m --target y --metric bogus", TAB, "--metric bogus"),
    Case("retrain --metric rmse on labels", "retrain", "m --target z --metric rmse", TAB, "numeric target"),
    Case("retrain --horizon without --timestamp", "retrain", "m --target y --horizon 3", TAB, "--timestamp"),
    Case("retrain --item-id without --timestamp", "retrain", "m --target y --item-id z", TAB, "--timestamp"),
    Case("retrain --horizon 0", "retrain", "m --target y --timestamp ts --horizon 0", TS, "--horizon must be positive"),
    Case("retrain --horizon x", "retrain", "m --target y --timestamp ts --horizon x", TS, "invalid int value"),
    # %%retrain: rows
    Case("retrain --target missing column", "retrain", "m --target nope", TAB, "--target nope"),
    Case("retrain --key missing column", "retrain", "m --target y --key nope", TAB, "--key nope"),
    Case("retrain target all NULL", "retrain", "m --target y", "SELECT x, z, NULL::INTEGER AS y FROM rows", "NULL in all 30 rows"),
    Case("retrain target one value", "retrain", "m --target y", "SELECT x, z, 1 AS y FROM rows", "single value"),
    Case("retrain too few rows", "retrain", "m --target y", TAB + " LIMIT 6", "add rows"),
    Case("retrain no rows", "retrain", "m --target y", TAB + " WHERE false", "returned no rows"),
    Case("retrain bad name", "retrain", "../m --target y", TAB, "invalid model name"),
    Case("retrain an LLM", "retrain", "bot --target y", TAB, "choose another name"),
    Case("retrain tabular model as time series", "retrain", "tab --timestamp ts", "SELECT x, y, z, ts FROM rows", "drop --timestamp"),
    Case("retrain time series without its timestamp", "retrain", "ts --target y", "SELECT x AS y FROM rows", "--timestamp ts: no such column"),
    Case("retrain another target", "retrain", "tab --target x", TAB, "tab predicts 'y'"),
    Case("retrain --timestamp missing column", "retrain", "m --target y --timestamp nope", TS, "--timestamp nope"),
    Case("retrain --item-id missing column", "retrain", "m --target y --timestamp ts --item-id nope", TS, "--item-id nope"),
    Case("retrain --timestamp not dates", "retrain", "m --target y --timestamp z", "SELECT z, v AS y FROM rows", "as dates"),
    Case("retrain --timestamp NULL", "retrain", "m --target y --timestamp ts", "SELECT NULL::DATE AS ts, v AS y FROM rows", "no timestamp"),
    Case("retrain time series target text", "retrain", "m --target z --timestamp ts", "SELECT ts, z FROM rows", "must be numeric"),
    Case("retrain time series target all NULL", "retrain", "m --target y --timestamp ts", "SELECT ts, NULL::DOUBLE AS y FROM rows", "NULL in all 30 rows"),
    Case("retrain time series duplicate timestamps", "retrain", "m --target y --timestamp ts",
         "SELECT DATE '2024-01-01' AS ts, v AS y FROM rows", "share a timestamp"),
    Case("retrain time series --presets bogus", "retrain", "m --target y --timestamp ts --presets bogus", TS, "--presets bogus"),
    Case("retrain time series uneven timestamps", "retrain", "m --target y --timestamp ts --horizon 2",
         "SELECT ts + INTERVAL (x * x) HOUR AS ts, v AS y FROM rows", "bucket them in the SQL"),
    Case("retrain time series too short", "retrain", "m --target y --timestamp ts --horizon 12", TS, "lower --horizon"),
    Case("retrain one series too short", "retrain", "m --target y --timestamp ts --item-id z --horizon 4",
         "SELECT ts, z, v AS y FROM rows", "series 'a' has 10 rows"),
    # %%rag: building
    Case("rag --chunk-size 0", "rag", "kb2 --chunk-size 0", RAG, "--chunk-size must be positive"),
    Case("rag --chunk-overlap too big", "rag", "kb2 --chunk-size 64 --chunk-overlap 64", RAG, "--chunk-overlap must be"),
    Case("rag --chunk-overlap -1", "rag", "kb2 --chunk-overlap -1", RAG, "--chunk-overlap must be"),
    Case("rag --top-k 0", "rag", "kb2 --top-k 0", RAG, "--top-k must be positive"),
    Case("rag --max-new-tokens x", "rag", "kb2 --max-new-tokens x", RAG, "invalid int value"),
    Case("rag --search fuzzy", "rag", "kb2 --search fuzzy", RAG, "--search must be one of"),
    Case("rag --promote maybe", "rag", "kb2 --promote maybe", RAG, "--promote must be one of"),
    Case("rag --where when building", "rag", "kb2 --where 'x = 1'", RAG, "use it with --ask"),
    Case("rag --id missing column", "rag", "kb2 --id nope", RAG, "no id column 'nope'"),
    Case("rag --text missing column", "rag", "kb2 --text nope", RAG, "--text column 'nope'"),
    Case("rag --metadata missing column", "rag", "kb2 --metadata nope", RAG, "--metadata column 'nope'"),
    Case("rag duplicate ids", "rag", "kb2", "SELECT 1 AS id, text FROM rows", "duplicate values"),
    Case("rag NULL ids", "rag", "kb2", "SELECT NULL::INTEGER AS id, text FROM rows", "NULL values"),
    Case("rag text all NULL", "rag", "kb2 --text text", "SELECT id, NULL::VARCHAR AS text FROM rows", "has no text"),
    Case("rag no text column", "rag", "kb2", "SELECT id, x FROM rows", "no text column"),
    Case("rag an LLM", "rag", "bot", RAG, "choose another name"),
    Case("rag --embed unknown", "rag", "kb2 --embed no/such-model", RAG, "unknown embedding model"),
    Case("rag --vector-store mysql", "rag", "kb2 --vector-store mysql://nbc@127.0.0.1/db", RAG, "not understood"),
    Case("rag --vector-store bad port, password", "rag", f"kb2 --vector-store postgresql://nbc:{SECRET}@127.0.0.1:port/db", RAG, "not understood"),
    Case("rag --vector-store bad port, password in query", "rag", f"kb2 --vector-store 'postgresql://nbc@127.0.0.1:port/db?password={SECRET}'", RAG,
         "not understood"),
    Case("rag --vector-store unreachable, password", "rag", f"kb2 --vector-store {PG}", RAG, "cannot connect to PostgreSQL at 127.0.0.1:1"),
    Case("rag refresh, unreachable server", "rag", "kbpg", RAG, "cannot connect to PostgreSQL at 127.0.0.1:1"),
    Case("rag --retrieve no question", "rag", "kb --retrieve", "  \n", "no question given"),
    Case("rag --retrieve and --ask", "rag", "kb --retrieve --ask", "what?", "use one of --ask or --retrieve"),
    Case("rag --retrieve --search fuzzy", "rag", "kb --retrieve --search fuzzy", "what?", "--search must be one of"),
    # %%rag --ask / --eval
    Case("rag --ask --top-k 0", "rag", "kb --ask --top-k 0", "what is fact 1?", "--top-k must be"),
    Case("rag --ask --top-k -3", "rag", "kb --ask --top-k -3", "what is fact 1?", "--top-k must be"),
    Case("rag --ask --search fuzzy", "rag", "kb --ask --search fuzzy", "what is fact 1?", "--search must be one of"),
    Case("rag --ask no question", "rag", "kb --ask", "  \n", "no question given"),
    Case("rag --ask unknown index", "rag", "nokb --ask", "what?", "unknown model 'nokb'"),
    Case("rag --ask an AutoML model", "rag", "tab --ask", "what?", "tab is a automl model"),
    Case("rag --ask --llm unknown", "rag", "kb --ask --llm no/such-model", "what?", "unknown base model"),
    Case("rag --ask --llm an AutoML model", "rag", "kb --ask --llm tab", "what?", "--llm tab"),
    Case("rag --ask and --eval", "rag", "kb --ask --eval", QA, "use one of --ask or --retrieve"),
    Case("rag --ask --where unknown column", "rag", "kb --ask --where 'nope = 1'", "what?", "use the metadata columns: id"),
    Case("rag --ask unreachable server", "rag", "kbpg --ask", "what?", "cannot connect to PostgreSQL at 127.0.0.1:1"),
    Case("rag --eval --top-k 0", "rag", "kb --eval --top-k 0", QA, "--top-k must be"),
    Case("rag --eval --where unknown column", "rag", "kb --eval --where 'nope = 1'", QA, "use the metadata columns: id"),
    Case("rag --eval no answer column", "rag", "kb --eval", "SELECT question FROM rows", "`answer` column"),
    Case("rag --eval no question column", "rag", "kb --eval", "SELECT answer FROM rows", "`question` column"),
    Case("rag --eval an AutoML model", "rag", "tab --eval", QA, "--eval is for RAG indexes"),
    Case("rag --eval unknown index", "rag", "nokb --eval", QA, "unknown model 'nokb'"),
    # %%predict
    Case("predict --version 0", "predict", "tab --version 0", TAB, "--version must be positive"),
    Case("predict --version x", "predict", "tab --version x", TAB, "invalid int value"),
    Case("predict --version 9 (unknown version)", "predict", "tab --version 9", TAB, "tab has no version 9"),
    Case("predict unknown model", "predict", "nope", TAB, "unknown model 'nope'"),
    Case("predict --top-k 0", "predict", "kb --top-k 0", QA, "--top-k must be positive"),
    Case("predict --max-new-tokens 0", "predict", "bot --max-new-tokens 0", LLM, "--max-new-tokens must be positive"),
    Case("predict --search fuzzy", "predict", "kb --search fuzzy", QA, "--search must be one of"),
    Case("predict --where on AutoML", "predict", "tab --where 'x = 1'", TAB, "--where, --search and --answers are for RAG indexes"),
    Case("predict --answers on AutoML", "predict", "tab --answers extractive", TAB, "--where, --search and --answers are for RAG indexes"),
    Case("rag --ask --answers unknown", "rag", "kb --ask --answers quoted", "Who?", "--answers must be one of"),
    Case("predict --into bad table name", "predict", "tab --into 'no;table'", TAB, "--into"),
    Case("predict RAG without question", "predict", "kb", "SELECT x FROM rows", "`question` column"),
    Case("predict time series without timestamp", "predict", "ts", "SELECT v AS y FROM rows", "timestamp column ts"),
    Case("predict unreachable server", "predict", "kbpg", QA, "cannot connect to PostgreSQL at 127.0.0.1:1"),
    Case("predict bad SQL", "predict", "tab", "SELECT * FROM nowhere", "SQL error"),
    # %nbc
    Case("nbc (nothing)", "nbc", "", match="needs a command"),
    Case("nbc unknown command", "nbc", "explode tab", match="unknown %nbc command"),
    Case("nbc list extra", "nbc", "list tab", match="wrong number of arguments"),
    Case("nbc show unknown model", "nbc", "show nope", match="unknown model 'nope'"),
    Case("nbc show unknown version", "nbc", "show tab@9", match="tab has no version 9"),
    Case("nbc show bad version", "nbc", "show tab@x", match="invalid version 'x'"),
    Case("nbc show bad name", "nbc", "show ../tab", match="invalid model name"),
    Case("nbc versions unknown model", "nbc", "versions nope", match="unknown model 'nope'"),
    Case("nbc versions (no name)", "nbc", "versions", match="wrong number of arguments"),
    Case("nbc activate unknown version", "nbc", "activate tab 9", match="tab has no version 9"),
    Case("nbc activate bad version", "nbc", "activate tab zero", match="invalid version 'zero'"),
    Case("nbc activate unknown model", "nbc", "activate nope 1", match="unknown model 'nope'"),
    Case("nbc rm unknown model", "nbc", "rm nope", match="unknown model 'nope'"),
    Case("nbc rm unknown version", "nbc", "rm tab@9", match="tab has no version 9"),
    Case("nbc rm unreachable server", "nbc", "rm kbpg", match="cannot connect to PostgreSQL at 127.0.0.1:1"),
    Case("nbc compare unknown version", "nbc", "compare tab 1 9", match="tab has no version 9"),
    Case("nbc compare one version", "nbc", "compare tab 1", match="wrong number of arguments"),
    Case("nbc runs bad name", "nbc", "runs ../x", match="invalid model name"),
    Case("nbc check unknown model", "nbc", "check nope", match="unknown model 'nope'"),
    Case("nbc check bad flag", "nbc", "check tab --fix", match="check [NAME] [--repair]"),
    Case("nbc export wrong kind", "nbc", "export tab --format gguf --to out", match="use --format deployment"),
    Case("nbc export unknown version", "nbc", "export tab@9 --format deployment --to out", match="tab has no version 9"),
    Case("nbc export unknown model", "nbc", "export nope --format deployment --to out", match="unknown model 'nope'"),
    Case("nbc export --format zip", "nbc", "export tab --format zip --to out", match="--format must be one of"),
    Case("nbc export --quant q4", "nbc", "export bot --format gguf --quant q4 --to out", match="--quant must be one of"),
    Case("nbc export no --format", "nbc", "export tab --to out", match="--format is required"),
    Case("nbc export no --to", "nbc", "export tab --format deployment", match="--to DIR is required"),
    Case("nbc export into the store", "nbc", "export tab --format deployment --to store/out", match="inside the store"),
    Case("nbc export into a full folder", "nbc", "export tab --format deployment --to full", match="not empty"),
    Case("nbc drift (no name)", "nbc", "drift", match="use %nbc drift NAME"),
    Case("nbc drift an LLM", "nbc", "drift bot", match="drift is measured for tabular"),
    Case("nbc drift nothing recorded", "nbc", "drift tab", match="give a query"),
    Case("nbc drift unknown version", "nbc", "drift tab@9", match="tab has no version 9"),
    Case("nbc drift unknown model", "nbc", "drift nope", match="unknown model 'nope'"),
    Case("nbc drift bad SQL", "nbc", "drift tab SELECT * FROM nowhere", match="SQL error"),
    Case("nbc job (no name)", "nbc", "job", match="use %nbc job NAME"),
    Case("nbc job no --every", "nbc", "job tab", match="--every"),
    Case("nbc job --every soon", "nbc", "job tab --every soon", match="use an interval"),
    Case("nbc job --every 0", "nbc", "job tab --every 0", match="use an interval"),
    Case("nbc job --min-rows 0", "nbc", "job tab --every 10m --track x --min-rows 0", match="--min-rows N"),
    Case("nbc job --min-rows without --track", "nbc", "job tab --every 10m --min-rows 5", match="--min-rows N needs --track"),
    Case("nbc job --promote maybe", "nbc", "job tab --every 10m --promote maybe", match="invalid choice"),
    Case("nbc job --track unknown column", "nbc", "job tab --every 10m --track nope", match="no column 'nope'",),
    Case("nbc job unknown model", "nbc", "job nope --every 10m", match="unknown model 'nope'"),
    Case("nbc job --stop without a job", "nbc", "job tab --stop", match="tab has no job"),
    Case("nbc job --cron in memory", "nbc", "job tab --every 10m --cron", match="in-memory database"),
    Case("nbc job --cron every 90s", "nbc", "job tab --every 90s --cron", match="whole minutes"),
]


def _run(ip, case: Case):
    if case.magic == "nbc":
        return ip.run_line_magic("nbc", case.line)
    return ip.run_cell_magic(case.magic, case.line, case.body)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.xfail(reason=c.xfail, strict=True)) if c.xfail else c for c in CASES], ids=[c.id for c in CASES]
)
def test_bad_input_is_one_line_that_says_what_to_do(ip, store_dir, capsys, prepared, case):
    shutil.copytree(prepared, store_dir)
    (store_dir.parent / "full").mkdir()
    (store_dir.parent / "full" / "keep.txt").write_text("not empty")
    ip.user_ns["rows"] = ROWS
    before = snapshot(store_dir)
    capsys.readouterr()
    with pytest.raises(NbCustomError) as error:
        _run(ip, case)
    out = capsys.readouterr()
    message = str(error.value)
    assert case.match in message
    assert message.strip() and "\n" not in message and len(message) <= MAX_LENGTH, message
    assert INSTRUCTION.search(message), f"says nothing to do: {message}"
    assert SECRET not in message and SECRET not in out.out and SECRET not in out.err
    assert "Traceback" not in out.out + out.err
    assert snapshot(store_dir) == before


def test_the_table_covers_every_magic_and_command():
    assert len(CASES) >= 50 and len({c.id for c in CASES}) == len(CASES)
    assert {c.magic for c in CASES} == {"finetune", "retrain", "rag", "predict", "nbc"}
    commands = {c.line.split()[0] for c in CASES if c.magic == "nbc" and c.line}
    assert {"list", "show", "versions", "activate", "rm", "compare", "runs", "check", "export", "drift", "job"} <= commands


def test_a_version_without_a_readable_manifest_is_one_line_and_stays_removable(ip, store_dir, prepared):
    shutil.copytree(prepared, store_dir)
    (store_dir / "tab" / "v1" / "manifest.json").write_text("{not json")
    before = snapshot(store_dir)
    with pytest.raises(NbCustomError, match=r"tab@1: manifest.json is missing or unreadable; remove it with %nbc rm tab@1") as error:
        ip.run_line_magic("nbc", "show tab@1")
    assert "\n" not in str(error.value) and snapshot(store_dir) == before
    ip.run_line_magic("nbc", "rm tab@1")
    assert [row["version"] for row in Store(store_dir).versions("tab")] == [2]
