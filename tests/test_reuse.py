"""What the performance work relies on (tests/benchmarks/bench_model_reuse.py and
bench_rag.py): the base LLM is loaded from disk once per process, and the RAG build's
batched tokenization and length-sorted embedding give the same chunks and vectors as
splitting and embedding one row at a time in order."""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest

from nbcustom import models
from nbcustom.specs import RagSpec


def test_a_second_load_llm_returns_the_same_objects_without_reading_the_disk(monkeypatch):
    path = models.resolve_llm(None)
    model, tokenizer = models.load_llm(path)
    loads = models.LOADS["count"]

    import transformers

    def no_disk(*args, **kwargs):
        raise AssertionError("the base model was read from disk again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_disk)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_disk)
    again, again_tokenizer = models.load_llm(models.resolve_llm(None))
    assert again is model and again_tokenizer is tokenizer
    assert models.LOADS["count"] == loads
    assert tokenizer.pad_token is not None and not model.training


@pytest.fixture(scope="module")
def embed_model():
    from nbcustom.engines.rag import index as rag, models as rag_models

    return rag_models.embedder(models.resolve_embedding(None), rag.EMBED_BATCH)


def _rows() -> pd.DataFrame:
    long = " ".join(f"Sentence {i} is about locker {i} and the parcel kept in it, which was checked twice." for i in range(120))
    texts = [f"Row {i}: the courier left parcel {i} at the {('north', 'south')[i % 2]} gate." + " More." * (i % 7) for i in range(40)]
    texts[3], texts[17] = long, "  spaced   out \n\n over lines  "
    return pd.DataFrame({"id": range(40), "text": texts, "topic": [("billing", "lockers", "staff")[i % 3] for i in range(40)]})


def test_split_with_batched_tokens_gives_the_chunks_of_a_plain_sentence_splitter(embed_model, monkeypatch):
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    from nbcustom.engines.rag import index as rag, models as rag_models

    monkeypatch.setattr(rag, "SPLIT_BATCH", 16)  # several slices, each tokenized at once
    monkeypatch.setattr(rag, "SPLIT_CHARS", 3000)  # the long row ends a slice early
    for options in ({"metadata": "topic", "chunk_size": 64, "chunk_overlap": 8}, {}):
        spec = RagSpec.from_options(**options)
        frame, _ = rag.documents(spec, _rows())
        chunks = rag.split(frame, spec, embed_model)

        tokenizer = partial(embed_model._model.tokenizer.encode, add_special_tokens=False)
        splitter = SentenceSplitter(chunk_size=spec.chunk_size, chunk_overlap=spec.chunk_overlap, tokenizer=tokenizer)
        docs = [Document(id_=r.row_id, text=r.text, metadata=r.metadata) for r in frame.itertuples(index=False)]
        with rag_models.quiet():
            nodes = splitter.get_nodes_from_documents(docs)
        assert [(c["row_id"], c["text"], c["embed_text"]) for c in chunks] == [
            (n.ref_doc_id, n.text, n.get_content(metadata_mode=MetadataMode.EMBED)) for n in nodes
        ]
        assert [c["chunk_id"] for c in chunks if c["row_id"] == "3"][:2] == ["3#0", "3#1"]  # the long row is split


def test_length_sorted_embedding_keeps_each_vector_with_its_text(embed_model):
    from nbcustom.engines.rag import index as rag

    texts = list(_rows()["text"])[:20] + ["short", "a much longer text about lockers, parcels, couriers and gates " * 4]
    seen = []
    vectors = rag.embed(embed_model, texts, seen.append)
    one_by_one = np.asarray([embed_model.get_text_embedding(t) for t in texts], dtype=np.float32)
    assert vectors.shape == one_by_one.shape and vectors.dtype == np.float32
    assert np.abs(vectors - one_by_one).max() < 1e-4
    assert seen[-1] == len(texts)
    assert rag.embed(embed_model, [], seen.append).shape[0] == 0


def test_a_build_chunks_embeds_and_writes_a_slice_of_rows_at_a_time(tmp_path, monkeypatch):
    """Only one slice's chunks and vectors are in memory; the index is the same as in one go."""
    import nbcustom
    from nbcustom.engines.rag import index as rag
    from nbcustom.engines.rag.stores import duckdb as rag_store

    rows = _rows()
    whole = nbcustom.rag("whole", rows, store=tmp_path / "store", ui="none")
    written = []
    monkeypatch.setattr(rag, "BUILD_SLICE", 3)
    monkeypatch.setattr(rag_store.Writer, "insert", lambda self, chunks, vectors, insert=rag_store.Writer.insert: written.append(len(chunks)) or insert(self, chunks, vectors))
    sliced = nbcustom.rag("sliced", rows, store=tmp_path / "store", ui="none")
    assert len(written) == -(-len(rows) // 3) and sum(written) == sliced.manifest["counts"]["chunks"] == whole.manifest["counts"]["chunks"]
    a, b = (rag_store.open({"folder": v.path, "file": "model/index.duckdb"}) for v in (whole, sliced))
    assert a.chunk_ids == b.chunk_ids
    if whole.manifest["index"]["embed_precision"] == "fp32":
        assert np.abs(a.matrix - b.matrix).max() < 1e-5
    else:  # bf16 (a CPU with native bf16): other batches, other padding, bf16 rounding
        assert (a.matrix * b.matrix).sum(1).min() > 1 - 1e-4


def test_vector_search_ranks_like_a_plain_matrix_product(tmp_path):
    from nbcustom.engines.rag.stores import duckdb as rag_store

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16)).astype(np.float32)
    chunks = [{"chunk_id": f"{i}#0", "row_id": str(i), "position": 0, "hash": "h", "text": f"t{i}", "metadata": {}} for i in range(500)]
    con = rag_store.create(tmp_path / rag_store.FILE, 16)
    rag_store.insert(con, chunks, vectors)
    rag_store.close(con)
    index = rag_store.Vectors({"folder": tmp_path, "file": rag_store.FILE})
    for _ in range(5):
        query = rng.standard_normal(16)
        expected = index.matrix @ (query / np.linalg.norm(query)).astype(np.float32)
        hits = index.search(query, 5)
        assert [i for i, _ in hits] == list(np.argsort(-expected, kind="stable")[:5])
        assert np.allclose([s for _, s in hits], np.sort(expected)[::-1][:5], atol=1e-6)
    assert len(index.search(query, 1000)) == 500 and index.search(query, 0) == []
