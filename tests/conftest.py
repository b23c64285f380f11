"""Shared fixtures: an in-process IPython shell with the extension, a fresh store per test."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests in this process train in it (the kernel's path with NbCustom.worker = 'off'): they
# patch engines and read their counters. Notebook kernels (notebooks.run_notebook, the
# examples) train in worker processes, the default; tests/test_worker.py tests the worker.
os.environ["NBCUSTOM_WORKER"] = "off"
# Under pytest-xdist (`make test` runs two test processes), each process and every kernel,
# worker and subprocess it starts gets its share of the cores: OpenMP's threads of two
# processes that each take every core spin against each other and are slower than one.
# AutoGluon sizes its fits (LightGBM's threads, the time series models' process pool) by
# AG_CPU_COUNT: three AutoGluon-heavy files took 108 s with it against 124 s without.
THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "AG_CPU_COUNT"):
        os.environ[_var] = str(THREADS)


@pytest.fixture(autouse=True)
def _thread_share():
    """Each test starts with its process's share of threads: AutoGluon's fits set torch's
    thread count to every core and leave it there."""
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(THREADS)


class TestingShell(InteractiveShell):
    """An IPython shell whose ``run_cell`` raises the cell's error, as jupysql's tests do."""

    def run_cell(self, raw_cell, *args, **kwargs):
        result = super().run_cell(raw_cell, *args, **kwargs)
        result.raise_error()
        return result


@pytest.fixture(scope="session")
def handbook(tmp_path_factory):
    """The store with tests/handbook.py indexed as ``hb``, once for the session (short
    answers keep generation cheap; pass ``max_new_tokens`` for longer ones)."""
    import nbcustom
    from handbook import documents_frame

    store = tmp_path_factory.mktemp("handbook") / "store"
    nbcustom.rag("hb", documents_frame(), store=store, ui="none", metadata="section", max_new_tokens=8)
    return store


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> str:
    """A 2-layer model with the embedded model's architecture and tokenizer, saved to disk."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nbcustom import models

    embedded = models.resolve_llm(None)
    config = AutoConfig.from_pretrained(embedded)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(embedded).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def shell():
    ip = TestingShell.instance()
    ip.run_line_magic("load_ext", "nbcustom")
    return ip


@pytest.fixture
def store_dir(tmp_path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def ip(shell, store_dir, monkeypatch):
    """The shell with this test's store and plain-text progress; namespace cleaned after."""
    monkeypatch.chdir(store_dir.parent)
    shell.run_line_magic("config", f"NbCustom.store = {str(store_dir)!r}")
    shell.run_line_magic("config", "NbCustom.ui = 'text'")
    shell.run_line_magic("config", "NbCustom.database = ':memory:'")
    before = set(shell.user_ns)
    yield shell
    for name in set(shell.user_ns) - before:
        shell.user_ns.pop(name, None)


def snapshot(root: Path) -> dict:
    """Every file's sha256 (the catalog by its rows): equal snapshots = an unchanged store."""
    if not root.exists():
        return {}
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir() or rel in (".lock", "catalog.duckdb") or rel.endswith(".wal"):
            continue
        state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    if (root / "catalog.duckdb").exists():
        import duckdb

        con = duckdb.connect(str(root / "catalog.duckdb"), read_only=True)
        for table in ("models", "versions", "runs"):
            state[f"catalog:{table}"] = con.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        con.close()
    return state
