"""Questions embedded in ONNX Runtime (``rag/onnx.py``): the same vectors as PyTorch's, used
for questions only, documents left to PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from handbook import QUESTIONS, documents_frame

pytest.importorskip("onnxruntime")


def test_questions_go_through_onnx_runtime_with_pytorchs_vectors(monkeypatch):
    from nbcustom.engines.rag import models as rag_models, onnx

    embed_model = rag_models.embedder(None)
    runner = onnx.runner(embed_model._model, embed_model.model_name)
    assert runner is not None  # MiniLM: Transformer -> mean Pooling -> Normalize
    calls = []
    monkeypatch.setattr(type(runner), "embed", lambda self, texts, *a, embed=type(runner).embed: calls.append(len(texts)) or embed(self, texts, *a))
    questions = [q for q, _, _ in QUESTIONS[:12]] + [documents_frame()["text"].iloc[0]]  # a long text too
    fast = np.asarray([embed_model.get_query_embedding(q) for q in questions[:3]] + embed_model.query_embeddings(questions[3:]))
    assert calls == [1, 1, 1, len(questions) - 3]
    plain = embed_model._model.encode(questions, normalize_embeddings=True)
    assert np.max(1 - (fast * plain).sum(1)) < 1e-5
    embed_model.get_text_embedding_batch(questions[:4])  # documents: PyTorch
    assert len(calls) == 4
