"""Documents embedded in bf16 where the CPU multiplies bf16 natively (issue 30.3): twice as
fast there, vectors within 1e-3 cosine of float32's; float32 on every other CPU (simulated by
patching the detection), with exactly the plain model's vectors. The manifest and the notes
say which."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import nbcustom
from handbook import documents_frame
from nbcustom.engines.llm import precision
from nbcustom.engines.rag import index as rag_index, models as rag_models

AVX2 = precision.CPUFeatures((), False, "AVX2")


def _texts() -> list[str]:
    return documents_frame()["text"].tolist()


def _build(store, monkeypatch, cpu=None):
    if cpu is not None:
        monkeypatch.setattr(precision, "cpu_features", lambda: cpu)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        version = nbcustom.rag("docs", documents_frame().head(6), store=store, ui="text")
    return version, out.getvalue()


@pytest.mark.skipif(not precision.cpu_features().native_bf16, reason="needs a CPU with native bf16 (amx_bf16 or avx512_bf16)")
def test_on_a_bf16_cpu_documents_are_embedded_in_bf16_within_1e_3_cosine(tmp_path, monkeypatch):
    embed_model = rag_models.embedder(None)
    texts = _texts()
    fast, plain = rag_index.embed(embed_model, texts, run_on=precision.choose("cpu", "bf16")), rag_index.embed(embed_model, texts)
    assert fast.dtype == np.float32 and not np.array_equal(fast, plain)  # bf16 arithmetic did run
    assert np.max(1 - (fast * plain).sum(1)) < 1e-3
    version, text = _build(tmp_path / "store", monkeypatch)
    assert version.manifest["index"]["embed_precision"] == "bf16"
    assert f"embedded in bf16 (this CPU has {' and '.join(precision.cpu_features().native_bf16)})" in text


def test_without_native_bf16_documents_are_embedded_in_float32_as_the_plain_model(tmp_path, monkeypatch):
    version, text = _build(tmp_path / "store", monkeypatch, AVX2)
    assert "embedded in fp32 (this CPU (AVX2) has no native bf16 (no amx_bf16 or avx512_bf16))" in text
    assert version.manifest["index"]["embed_precision"] == "fp32"
    embed_model = rag_models.embedder(None)
    texts = _texts()[:8]
    plain = embed_model._model.encode(texts, normalize_embeddings=True)
    assert np.max(np.abs(rag_index.embed(embed_model, texts, run_on=precision.choose("cpu")) - plain)) < 1e-6
