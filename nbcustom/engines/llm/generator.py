"""A committed LLM version ready to use: ``load(version)`` gives a ``Generator`` for
``%%predict``, ``nbcustom.load`` and exports. A label model's ``predict`` answers only
its labels, with a confidence."""

from __future__ import annotations

import functools
from pathlib import Path

from ... import models
from ...errors import NbCustomError
from . import data as llm_data, labels as llm_labels
from .generate import adapted, generate
from .train import device_for


def load(version) -> "Generator":
    """The tuned model of ``version``, ready to generate."""
    return Generator(version)


class Generator:
    """A fine-tuned LLM version: ``generate(prompts)``, ``classify(prompts)`` (label
    models), ``predict(rows)``, ``merged()``."""

    rowwise = True  # each row's prediction depends on that row alone: %%predict --into streams

    def __init__(self, version):
        self.version = version
        info = version.manifest.get("llm", {})
        self.prompt_column = info.get("prompt", "prompt")
        self.system = info.get("system")
        self.labels = info.get("labels")  # None: a free-text model
        self.max_new_tokens = version.manifest.get("options", {}).get("max_new_tokens", 64)
        self.adapter_dir = version.model_dir
        # the precision it was trained and evaluated in (versions made before --precision: fp32 on CPU)
        self.precision = version.manifest.get("options", {}).get("precision") or ("auto" if info.get("device") == "cuda" else "fp32")

    def __repr__(self) -> str:
        return f"Generator({self.version.name}@{self.version.version})"

    def _base(self):
        base = self.version.manifest.get("base", {})
        path = Path(base["path"]) if base.get("path") and Path(base["path"]).is_dir() else models.resolve_llm(base.get("name"))
        return models.load_llm(path, self.run_on.device, self.run_on.weights)

    @functools.cached_property
    def run_on(self):
        """Where and in which precision this version computes (decided once)."""
        return device_for("auto", self.precision, strict=False)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, system: str | list | None = None) -> list[str]:
        """Greedy completions of ``prompts`` (chat template with the version's system message)."""
        return self._run(prompts, system, lambda model, tokenizer, ids: generate(model, tokenizer, ids, max_new_tokens or self.max_new_tokens))

    def classify(self, prompts: list[str], system: str | list | None = None) -> tuple[list[str], list[float]]:
        """A label model's best label for each prompt and its confidence (softmax over the labels' scores)."""
        if not self.labels:
            raise NbCustomError(f"{self.version.name}@{self.version.version} answers free text, not labels: use generate()")
        return self._run(prompts, system, lambda model, tokenizer, ids: llm_labels.classify(model, tokenizer, ids, self.labels))

    def _run(self, prompts, system, answer):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        systems = system if isinstance(system, list) else [system or self.system] * len(prompts)
        with models.quiet():
            model, tokenizer = self._base()
            ids = [llm_data.prompt_ids(tokenizer, p, s) for p, s in zip(prompts, systems)]
            with adapted(model, adapter_dir=self.adapter_dir) as peft_model, self.run_on.computing(peft_model, training=False):
                return answer(peft_model, tokenizer, ids)

    def predict(self, rows, max_new_tokens: int | None = None):
        """``rows`` with a ``prediction`` column from the prompt column: a generation, or
        for a label model the best label and its ``confidence``."""
        column = self.prompt_column if self.prompt_column in rows.columns else "prompt"
        llm_data.check_rows(rows, column, None)
        systems = llm_data.systems(rows, self.system)
        prompts = rows[column].astype(str).tolist()
        out = rows.copy()
        if self.labels:
            out["prediction"], out["confidence"] = self.classify(prompts, systems)
        else:
            out["prediction"] = self.generate(prompts, max_new_tokens, systems)
        return out

    def merged(self):
        """A standalone transformers model with the adapter merged into (a copy of) the base."""
        import copy

        from peft import PeftModel

        with models.quiet():
            model, _ = self._base()
            return PeftModel.from_pretrained(copy.deepcopy(model), self.adapter_dir).merge_and_unload()

    @property
    def tokenizer(self):
        with models.quiet():
            return self._base()[1]
