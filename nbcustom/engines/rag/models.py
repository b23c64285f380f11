"""The RAG engine's two local models as llama-index components: a sentence-transformers
embedding model (counted, so tests and refresh reports can check what was embedded) and
the answering LLM, a small ``CustomLLM`` over a transformers causal LM.

Both are set as ``llama_index.core.Settings`` so nothing in llama-index falls back to a
hosted API. Heavy imports stay inside functions.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from ... import models
from ...models import quiet

# Texts embedded in this process: documents (chunks written to an index) and queries.
EMBED_CALLS = {"documents": 0, "queries": 0}
_EMBEDDERS: dict[str, Any] = {}
_LLMS: dict[str, Any] = {}
_CLASSES: dict[str, type] = {}
BATCH = 8  # prompts generated together (left-padded)


def embedder(name: str | None, batch_size: int = 64):
    """The llama-index embedding model for ``name`` (default all-minilm-l6-v2), loaded once."""
    path = models.resolve_embedding(name)
    if path not in _EMBEDDERS:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        with quiet():
            _EMBEDDERS[path] = _embedding_class()(model_name=path, device="cpu", embed_batch_size=batch_size, normalize=True)
    return _EMBEDDERS[path]


def dimension(embed_model) -> int:
    """The length of the embedding model's vectors, without embedding anything."""
    model = embed_model._model
    return (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()


def _embedding_class() -> type:
    """``HuggingFaceEmbedding`` that counts the texts it embeds (in ``EMBED_CALLS``)."""
    if "embed" not in _CLASSES:
        from llama_index.embeddings.huggingface import HuggingFaceEmbedding

        class CountingEmbedding(HuggingFaceEmbedding):
            def _get_query_embedding(self, query: str) -> list[float]:
                EMBED_CALLS["queries"] += 1
                return super()._get_query_embedding(query)

            def query_embeddings(self, queries: list[str]) -> list[list[float]]:
                """Several queries in one batch (llama-index embeds queries one at a time). Once
                ONNX Runtime runs the model nothing can print, so only the first call and the
                PyTorch path are kept quiet (``quiet`` costs 3 ms: each logger level it sets
                clears every logger's cache)."""
                from . import onnx

                EMBED_CALLS["queries"] += len(queries)
                if not queries:
                    return []
                fast = onnx.made(self.model_name)
                if fast is not None:
                    return fast.embed(list(queries), self.embed_batch_size, self.normalize)
                with quiet():
                    return self._embed(list(queries), prompt_name="query")

            def _embed(self, inputs, prompt_name=None) -> list[list[float]]:
                """Questions in ONNX Runtime where it applies (``onnx.py``: the same vectors, in
                half the time); documents as llama-index embeds them (ONNX Runtime measured no
                faster on batches)."""
                from . import onnx

                fast = onnx.runner(self._model, self.model_name) if prompt_name == "query" else None
                if fast is not None and all(isinstance(i, str) for i in inputs):
                    return fast.embed(list(inputs), self.embed_batch_size, self.normalize)
                return super()._embed(inputs, prompt_name)

            def _get_text_embedding(self, text: str) -> list[float]:
                EMBED_CALLS["documents"] += 1
                return super()._get_text_embedding(text)

            def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
                EMBED_CALLS["documents"] += len(texts)
                return super()._get_text_embeddings(texts)

        _CLASSES["embed"] = CountingEmbedding
    return _CLASSES["embed"]


def answerer(name: str | None, max_new_tokens: int = 96):
    """The llama-index LLM that answers (default smollm2-135m-instruct), loaded once."""
    path = models.resolve_llm(name)
    key = str(path)
    if key not in _LLMS:
        with quiet():
            model, tokenizer = models.load_llm(path, device="cpu")
        _LLMS[key] = _llm_class()(model_path=key, max_new_tokens=max_new_tokens, model=model, tokenizer=tokenizer)
    llm = _LLMS[key]
    llm.max_new_tokens = max_new_tokens
    return llm


def use(embed_model, llm=None) -> None:
    """Make these the llama-index defaults, so no component reaches for OpenAI."""
    from llama_index.core import Settings

    Settings.embed_model = embed_model
    if llm is not None:
        Settings.llm = llm


def _llm_class() -> type:
    if "llm" not in _CLASSES:
        from llama_index.core.base.llms.types import ChatMessage, CompletionResponse, LLMMetadata
        from llama_index.core.llms import CustomLLM
        from llama_index.core.llms.callbacks import llm_completion_callback
        from pydantic import PrivateAttr

        class LocalLLM(CustomLLM):
            """A local transformers chat model, greedy decoding, chat-template prompts."""

            model_path: str
            max_new_tokens: int = 96
            _model: Any = PrivateAttr()
            _tokenizer: Any = PrivateAttr()

            def __init__(self, model, tokenizer, **kwargs):
                super().__init__(**kwargs)
                self._model, self._tokenizer = model, tokenizer
                self.messages_to_prompt = self.chat_prompt

            @property
            def metadata(self) -> LLMMetadata:
                window = getattr(self._model.config, "max_position_embeddings", 2048)
                return LLMMetadata(context_window=window, num_output=self.max_new_tokens, model_name=self.model_path)

            def chat_prompt(self, messages: Sequence[ChatMessage]) -> str:
                turns = [{"role": m.role.value, "content": m.content or ""} for m in messages]
                return self._tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

            @llm_completion_callback()
            def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
                if not formatted:
                    prompt = self.chat_prompt([ChatMessage(role="user", content=prompt)])
                return CompletionResponse(text=self.generate([prompt], **kwargs)[0])

            @llm_completion_callback()
            def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any):
                response = self.complete(prompt, formatted=formatted, **kwargs)
                yield response

            def generate(self, prompts: Sequence[str], max_new_tokens: int | None = None, progress=None) -> list[str]:
                """Greedy answers to chat-formatted ``prompts``, a batch at a time."""
                import torch

                tokenizer, out = self._tokenizer, []
                limit = max_new_tokens or self.max_new_tokens
                for start in range(0, len(prompts), BATCH):
                    batch = list(prompts[start : start + BATCH])
                    enc = tokenizer(batch, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
                    with quiet(), torch.inference_mode():
                        generated = self._model.generate(
                            **enc, max_new_tokens=limit, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                        )
                    new = generated[:, enc["input_ids"].shape[1] :]
                    out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)]
                    if progress:
                        progress(len(out))
                return out

        _CLASSES["llm"] = LocalLLM
    return _CLASSES["llm"]
