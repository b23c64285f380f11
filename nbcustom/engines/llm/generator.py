"""A committed LLM version ready to use: ``load(version)`` gives a ``Generator`` for
``%%predict``, ``nbcustom.load`` and exports."""

from __future__ import annotations

from pathlib import Path

from ... import models
from . import data as llm_data
from .generate import adapted, generate
from .train import device_for


def load(version) -> "Generator":
    """The tuned model of ``version``, ready to generate."""
    return Generator(version)


class Generator:
    """A fine-tuned LLM version: ``generate(prompts)``, ``predict(rows)``, ``merged()``."""

    def __init__(self, version):
        self.version = version
        info = version.manifest.get("llm", {})
        self.prompt_column = info.get("prompt", "prompt")
        self.system = info.get("system")
        self.max_new_tokens = version.manifest.get("options", {}).get("max_new_tokens", 64)
        self.adapter_dir = version.model_dir
        # the precision it was trained and evaluated in (versions made before --precision: fp32 on CPU)
        self.precision = version.manifest.get("options", {}).get("precision") or ("auto" if info.get("device") == "cuda" else "fp32")

    def __repr__(self) -> str:
        return f"Generator({self.version.name}@{self.version.version})"

    def _base(self):
        base = self.version.manifest.get("base", {})
        path = Path(base["path"]) if base.get("path") and Path(base["path"]).is_dir() else models.resolve_llm(base.get("name"))
        run_on = device_for("auto", self.precision)
        return models.load_llm(path, run_on.device, run_on.weights)

    def generate(self, prompts: list[str], max_new_tokens: int | None = None, system: str | list | None = None) -> list[str]:
        """Greedy completions of ``prompts`` (chat template with the version's system message)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        systems = system if isinstance(system, list) else [system or self.system] * len(prompts)
        with models.quiet():
            model, tokenizer = self._base()
            ids = [llm_data.prompt_ids(tokenizer, p, s) for p, s in zip(prompts, systems)]
            with adapted(model, adapter_dir=self.adapter_dir) as peft_model, device_for("auto", self.precision).autocast():
                return generate(peft_model, tokenizer, ids, max_new_tokens or self.max_new_tokens)

    def predict(self, rows, max_new_tokens: int | None = None):
        """``rows`` with a ``prediction`` column generated from the prompt column."""
        column = self.prompt_column if self.prompt_column in rows.columns else "prompt"
        llm_data.check_rows(rows, column, None)
        systems = llm_data.systems(rows, self.system)
        out = rows.copy()
        out["prediction"] = self.generate(rows[column].astype(str).tolist(), max_new_tokens, systems)
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
