"""Answers from retrieved chunks: the prompt a small local model follows, and the readers
that generate from it (the index's answering model or a ``%%finetune``d LLM version).

What the prompt does, each measured on the handbook set (tests/benchmarks/RESULTS.md): no
``[1]`` markers (a 135M model copies them as answers), only the chunks whose similarity is
close to the best one's, the best chunk last (nearest the question).
"""

from __future__ import annotations

from typing import Callable, Sequence

from . import faithfulness

SYSTEM_CONTEXT = "Answer the question with a short answer taken from the context."
SYSTEM_ALONE = "Answer the question with a short answer."
# A chunk goes into the prompt when its similarity is at least this share of the best's.
KEEP = 0.8

Turn = tuple[str, str]  # (system message, user message)


def kept(sources: Sequence[dict]) -> list[dict]:
    """The sources that go into the prompt: the first one, and the others whose cosine
    similarity is close to its."""
    if not sources:
        return []
    cosine = [s.get("vector_score", s["score"]) for s in sources]
    return [s for i, s in enumerate(sources) if i == 0 or cosine[i] >= KEEP * cosine[0]]


def with_context(question: str, sources: Sequence[dict]) -> Turn:
    """The prompt for ``question`` given its retrieved ``sources`` (best first)."""
    context = "\n\n".join(s["text"] for s in reversed(kept(sources)))
    return SYSTEM_CONTEXT, f"Context:\n{context}\n\nQuestion: {question}"


def extract(question: str, sources: Sequence[dict]) -> str:
    """The sentence of the prompt's chunks that shares the most content words with the
    question (ties: the better-ranked chunk, then the earlier sentence); "" without sources."""
    asked, _ = faithfulness.terms(question)
    best, most = "", -1
    for source in kept(sources):
        labels = {f"{k}: {v}" for k, v in (source.get("metadata") or {}).items()}  # the rendered metadata lines
        for sentence in faithfulness.sentences(source["text"]):
            shared = len(asked & faithfulness.terms(sentence)[0])
            if sentence not in labels and shared > most:
                best, most = sentence, shared
    return best


def grounded(answer: str, question: str, sources: Sequence[dict]) -> str:
    """The sentences of ``answer`` that the sources support; where none is, the source
    sentence that best matches the question (``extract``)."""
    supported = [s for s, ok in faithfulness.check(answer, [s["text"] for s in sources]) if ok]
    return " ".join(supported) if supported else extract(question, sources)


def alone(question: str) -> Turn:
    """The prompt for ``question`` without retrieval (the before side of ``--eval``)."""
    return SYSTEM_ALONE, question


class Reader:
    """The index's answering model (a llama-index ``LocalLLM``) answering chat turns."""

    def __init__(self, llm):
        self.llm = llm

    def __repr__(self) -> str:
        return f"Reader({self.llm.model_path})"

    def generate(self, turns: Sequence[Turn], max_new_tokens: int, progress: Callable[[int], None] | None = None) -> list[str]:
        from llama_index.core.base.llms.types import ChatMessage

        prompts = [
            self.llm.chat_prompt([ChatMessage(role="system", content=system), ChatMessage(role="user", content=user)])
            for system, user in turns
        ]
        return self.llm.generate(prompts, max_new_tokens=max_new_tokens, progress=progress)


class TunedReader:
    """A ``%%finetune``d LLM version (``engines.llm.Generator``: base + LoRA adapter)
    answering the same chat turns."""

    def __init__(self, generator):
        self.generator = generator

    def __repr__(self) -> str:
        return f"TunedReader({self.generator.version.name}@{self.generator.version.version})"

    def generate(self, turns: Sequence[Turn], max_new_tokens: int, progress: Callable[[int], None] | None = None) -> list[str]:
        answers = self.generator.generate([u for _, u in turns], max_new_tokens, system=[s for s, _ in turns])
        if progress:
            progress(len(answers))
        return answers
