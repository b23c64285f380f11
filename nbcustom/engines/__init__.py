"""Engines train, evaluate and load models. They know nothing of IPython; heavy libraries
are imported inside their functions.

Every training engine returns an ``Outcome``; ``nbcustom.api`` writes it into the version.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

KINDS = ("llm", "automl", "rag")
# export format -> (the model kind it is for, its writer "module:function" in this package);
# a writer takes (version, empty folder, ExportSpec) and returns lines saying what it wrote
EXPORTS = {
    "merged": ("llm", "llm.export:merged"),
    "gguf": ("llm", "llm.export:gguf"),
    "ollama": ("llm", "llm.export:ollama"),
    "vllm": ("llm", "llm.vllm:export"),
    "deployment": ("automl", "automl.deployment:export"),
    "parquet": ("rag", "rag.parquet:export"),
}


@dataclass
class Outcome:
    """What a training run produced, besides the model files it wrote into ``build.model_dir``."""

    before: dict = field(default_factory=dict)  # metrics of the previous version / base model
    after: dict = field(default_factory=dict)  # metrics of the new version, same holdout
    counts: dict = field(default_factory=dict)  # read, trained, held_out, ...
    train_rows: Any = None  # DataFrame saved as train.parquet
    examples: Any = None  # DataFrame saved as eval.parquet (per-example before/after)
    charts: dict = field(default_factory=dict)  # file stem -> PNG bytes, saved as STEM.png
    tables: dict = field(default_factory=dict)  # title -> DataFrame, shown in the summary
    info: dict = field(default_factory=dict)  # extra manifest fields (base, reused, ...)
    notes: list = field(default_factory=list)  # lines for the summary
    before_label: str = "before"
    after_label: str | None = None  # None: the new version's number, "vN"


def engine(kind: str):
    """The engine module for a model kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}")
    return importlib.import_module(f"nbcustom.engines.{kind}")


def release(version) -> None:
    """Before ``version`` is removed: let its engine free what it keeps outside the version
    folder (a RAG index's table on a PostgreSQL server)."""
    free = getattr(engine(version.kind), "release", None)
    if free is not None:
        free(version)


def exporter(format: str) -> tuple[str, Any]:
    """(model kind, writer) of an export format."""
    kind, target = EXPORTS[format]
    module, function = target.split(":")
    return kind, getattr(importlib.import_module(f"nbcustom.engines.{module}"), function)
