"""One options dataclass per magic: built once from flags or keywords, validated once, and
stored in the manifest as it is. The magics' flags are generated from these fields."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import NbCustomError


def option(default: Any, help: str, *, type: Any = None, flag: str | None = None, choices=None):
    """A spec field with the metadata the flag parser needs."""
    return field(default=default, metadata={"help": help, "type": type, "flag": flag, "choices": choices})


class Spec:
    """Shared behaviour of the spec dataclasses."""

    @classmethod
    def from_options(cls, **options):
        """Build from keyword options; an unknown one is a one-line error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise NbCustomError(
                f"unknown option {unknown[0]!r}; valid options: {', '.join(sorted(n.replace('_', '-') for n in names))}"
            )
        spec = cls(**{k: v for k, v in options.items() if v is not None or _nullable(cls, k)})
        spec.validate()
        return spec

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise NbCustomError(f"--{flag_of(f)} must be one of {', '.join(choices)}, not {value!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def columns(self, name: str) -> list[str]:
        """A comma-separated column list option as a list."""
        value = getattr(self, name)
        return [c.strip() for c in value.split(",") if c.strip()] if value else []

    def _positive(self, *names: str) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        for name in names:
            value = getattr(self, name)
            if value is not None and value <= 0:
                least = " (at least 1)" if isinstance(value, int) else ""
                raise NbCustomError(f"--{flag_of(fields[name])} must be positive{least}, not {value}")

    def _fraction(self, name: str) -> None:
        value = getattr(self, name)
        if not 0 < value < 1:
            raise NbCustomError(f"--{name.replace('_', '-')} must be between 0 and 1, not {value}")


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or f.name.replace("_", "-")


def _nullable(cls, name: str) -> bool:
    return next(f for f in dataclasses.fields(cls) if f.name == name).default is None


PROMOTE = ("always", "if-better", "never")
ANSWERS = ("grounded", "generated", "extractive")
SEARCH = ("vector", "keyword", "hybrid")
TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")  # as model names: quoted in SQL, so - is fine


def promote_option():
    """``--promote``, shared by the training magics (decided in ``nbcustom.promotion``)."""
    return option("always", "always, if-better or never: make the new version the active one (jobs: if-better)", choices=PROMOTE)


@dataclass
class FinetuneSpec(Spec):
    """``%%finetune``: LoRA for LLMs, or a no-search update for AutoML models."""

    base: str | None = option(None, "base model: alias, local path or Hugging Face id (default smollm2-135m-instruct)")
    prompt: str = option("prompt", "column with the prompts")
    response: str = option("response", "column with the responses to learn")
    system: str | None = option(None, "system message for every example (or a `system` column)")
    epochs: float = option(3.0, "training epochs", type=float)
    max_steps: int | None = option(None, "stop after this many optimizer steps", type=int)
    lr: float | None = option(None, "learning rate (default: 3e-3 for a label task, 2e-4 for free text)", type=float)
    batch_size: int | None = option(None, "examples per step (default: chosen from the data)", type=int)
    max_length: int = option(512, "longest example in tokens; longer ones are dropped", type=int)
    lora_r: int = option(16, "LoRA rank", type=int)
    lora_alpha: int = option(32, "LoRA alpha", type=int)
    eval_frac: float = option(0.1, "fraction of rows held out for before/after", type=float)
    seed: int = option(0, "seed for the split and training", type=int)
    device: str = option("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = option("auto", "auto, fp32 or bf16 (auto: bf16 on a GPU and on CPUs with AMX or AVX512-BF16)", choices=("auto", "fp32", "bf16"))
    from_version: int | None = option(None, "continue from this version instead of the active one", type=int, flag="from")
    resume: bool = option(False, "resume an interrupted run from its last checkpoint", type=bool)
    compile: bool = option(False, "LLM on a GPU: compile the layers and use flex attention (pays off on long runs)", type=bool)
    max_new_tokens: int = option(64, "longest generation when evaluating", type=int)
    devices: int = option(1, "LLM: train in this many torchrun worker processes (GPUs with --device cuda, else CPU processes)", type=int)
    launcher: str | None = option(None, "LLM: torchrun command line for several machines (default: NbCustom.launcher / NBCUSTOM_LAUNCHER)")
    time_limit: int | None = option(None, "AutoML update: seconds (default: the previous version's)", type=int)
    task: str = option("auto", "LLM: labels (answer one of the response column's values), text, or auto (labels when it has few short values)", choices=("auto", "text", "labels"))
    eval_every: int | None = option(None, "LLM: holdout loss every N steps (default: about ten times per run, at least once per epoch)", type=int)
    patience: int | None = option(None, "LLM: stop after K evaluations without an improvement of the holdout loss (0: never; default: 2 for labels, 0 for text)", type=int)
    keep: str = option("best", "LLM: save the adapter of the best holdout loss (best) or of the last step (last)", choices=("best", "last"))
    method: str = option("auto", "LLM: sft (learn the responses), dpo (prefer --chosen over --rejected), kto (good and bad answers, --feedback) or auto (dpo with chosen and rejected columns, kto with --feedback, else sft)", choices=("auto", "sft", "dpo", "kto"))
    chosen: str = option("chosen", "dpo: column with the preferred answers")
    rejected: str = option("rejected", "dpo: column with the answers not preferred")
    feedback: str | None = option(None, "kto: boolean column, true where the response is good")
    beta: float = option(0.1, "dpo/kto: how far the tuned model may move from its reference (the papers' beta)", type=float)
    promote: str = promote_option()

    def validate(self) -> None:
        super().validate()
        self._positive("beta", "epochs", "max_steps", "lr", "batch_size", "max_length", "lora_r", "lora_alpha", "max_new_tokens", "time_limit", "devices",
                       "eval_every", "from_version")
        self._fraction("eval_frac")
        if self.patience is not None and self.patience < 0:
            raise NbCustomError(f"--patience must be 0 (never stop early) or more, not {self.patience}")


@dataclass
class RetrainSpec(Spec):
    """``%%retrain``: AutoGluon from scratch on the previous rows plus the new ones."""

    target: str | None = option(None, "column to predict (required; later versions inherit it)")
    timestamp: str | None = option(None, "time column: makes it a time-series model")
    item_id: str | None = option(None, "series id column (time series; default one series)")
    horizon: int | None = option(None, "steps to forecast (time series; default 7)", type=int)
    known: str | None = option(None, "time series: known covariates, comma-separated: columns whose future values are given when forecasting")
    key: str | None = option(None, "a new row replaces the old row with the same key")
    time_limit: int = option(60, "seconds for AutoGluon's fit", type=int)
    presets: str = option("medium_quality", "AutoGluon presets")
    eval_frac: float = option(0.2, "fraction of rows in the holdout (tabular)", type=float)
    metric: str | None = option(None, "AutoGluon eval metric (default: AutoGluon's choice)")
    seed: int = option(0, "seed", type=int)
    promote: str = promote_option()

    def validate(self) -> None:
        super().validate()
        self._positive("horizon", "time_limit")
        self._fraction("eval_frac")

    def inherit(self, previous: dict | None) -> "RetrainSpec":
        """Fill the data-shape options left out (target, timestamp, item id, horizon, key, known)
        from the previous version's options, then check the result."""
        if previous:
            for name in ("target", "timestamp", "item_id", "horizon", "key", "known"):
                if getattr(self, name) is None:
                    value = previous.get(name)
                    setattr(self, name, ",".join(value) if isinstance(value, list) else value)
        if not self.target:
            raise NbCustomError("--target COL is required: name the column to predict")
        if (self.item_id or self.horizon or self.known) and not self.timestamp:
            raise NbCustomError("--item-id, --horizon and --known need --timestamp COL (time series)")
        if self.timestamp and self.horizon is None:
            self.horizon = 7
        return self


@dataclass
class RagSpec(Spec):
    """``%%rag``: build or refresh a retrieval index over rows."""

    text: str | None = option(None, "text column(s), comma-separated (default: all text columns)")
    id: str = option("id", "row id column")
    metadata: str | None = option(None, "metadata columns, comma-separated")
    chunk_size: int = option(512, "chunk size in tokens", type=int)
    chunk_overlap: int = option(64, "chunk overlap in tokens", type=int)
    top_k: int = option(4, "chunks retrieved per question", type=int)
    embed: str | None = option(None, "embedding model (default all-minilm-l6-v2)")
    llm: str | None = option(None, "answering model (default smollm2-135m-instruct); with --ask/--eval also a %%finetune'd LLM (a reader)")
    append: bool = option(False, "keep rows missing from the query", type=bool)
    max_new_tokens: int = option(96, "longest answer in tokens", type=int)
    promote: str = promote_option()
    vector_store: str | None = option(
        None, "where the vectors live: duckdb (a file in the version) or postgresql://USER@HOST:PORT/DB "
        "(default: where the previous version's are; a new index: duckdb)",
    )
    search: str = option("hybrid", "ranking of chunks: vector, keyword (BM25) or hybrid (both, fused)", choices=SEARCH)
    where: str | None = option(None, "--ask/--eval: only chunks whose metadata satisfy this SQL predicate")
    answers: str = option(
        "grounded", "grounded (the model's sentences the sources support, else the best-matching source sentence), "
        "generated (the model's answer as it is) or extractive (that source sentence, no model)", choices=ANSWERS,
    )

    def validate(self) -> None:
        super().validate()
        self._positive("chunk_size", "top_k", "max_new_tokens")
        if self.vector_store not in (None, "duckdb"):
            from .credentials import strip

            self.vector_store = strip(self.vector_store)  # the password never reaches the manifest
        if not 0 <= self.chunk_overlap < self.chunk_size:
            raise NbCustomError("--chunk-overlap must be at least 0 and smaller than --chunk-size")



@dataclass
class PredictSpec(Spec):
    """``%%predict``: the model's output appended to the query's rows."""

    version: int | None = option(None, "version to use (default: the active one)", type=int)
    into: str | None = option(None, "also write the result to this DuckDB table")
    max_new_tokens: int | None = option(None, "LLM/RAG: longest generation", type=int)
    top_k: int | None = option(None, "RAG: chunks retrieved per question", type=int)
    search: str | None = option(None, "RAG: vector, keyword or hybrid (default: the index's)", choices=SEARCH)
    where: str | None = option(None, "RAG: only chunks whose metadata satisfy this SQL predicate")
    answers: str | None = option(None, "RAG: grounded, generated or extractive (default: the index's)", choices=ANSWERS)

    def validate(self) -> None:
        super().validate()
        self._positive("version", "max_new_tokens", "top_k")
        if self.into is not None and not TABLE.fullmatch(self.into):
            raise NbCustomError(f"--into {self.into!r}: name a table with letters, digits, _ and -, starting with a letter or _")


@dataclass
class AnswerSpec(Spec):
    """``%%rag NAME --ask`` / ``--eval`` and ``ask``, ``rag_eval``, ``rag_prompts``: how the
    chunks for each question are found, and who reads them (checked before anything loads)."""

    top_k: int | None = option(None, "chunks retrieved per question (default: the index's)", type=int)
    search: str | None = option(None, "vector, keyword or hybrid (default: the index's)", choices=SEARCH)
    where: str | None = option(None, "only chunks whose metadata satisfy this SQL predicate")
    llm: str | None = option(None, "the reader: a %%finetune'd LLM or a model (default: the index's)")
    answers: str | None = option(None, "grounded, generated or extractive (default: the index's)", choices=ANSWERS)

    def validate(self) -> None:
        super().validate()
        self._positive("top_k")


@dataclass
class ExportSpec(Spec):
    """``%nbc export``: a version written in a format other tools load."""

    format: str | None = option(None, "merged, gguf, ollama or vllm (LLM); deployment (AutoML); parquet (RAG)",
                                choices=("merged", "gguf", "ollama", "vllm", "deployment", "parquet"))
    to: str | None = option(None, "folder to write (new or empty; never inside the store)")
    quant: str = option("q8_0", "GGUF weights: f16 or q8_0", choices=("f16", "q8_0"))
    refit: bool = option(False, "AutoML: refit the best model on all rows first (refit_full)", type=bool)

    def validate(self) -> None:
        super().validate()
        if not self.format:
            raise NbCustomError("--format is required: merged, gguf, ollama or vllm (LLM), deployment (AutoML), parquet (RAG)")
        if not self.to:
            raise NbCustomError("--to DIR is required: the folder to write the export into")
