"""The RAG engine (llama-index): build or refresh an index over table rows, answer questions
with cited sources, evaluate the LLM alone against the LLM with retrieval.

Each row becomes a llama-index ``Document`` (id, text, metadata), split by
``SentenceSplitter`` and embedded with the local embedding model; the vectors live in a
vector store (``stores``: a DuckDB file in the version, or PostgreSQL with pgvector). A
refresh embeds only rows whose content hash changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Any, Iterator, Sequence

from ...errors import NbCustomError
from ...specs import RagSpec
from .. import Outcome
from ..llm import precision as llm_precision
from . import answers as rag_answers, faithfulness as rag_faithfulness, models as rag_models, search as rag_search, stores
from .models import EMBED_CALLS  # noqa: F401  (re-exported: texts embedded in this process)

SNIPPET = 200  # characters of a source shown with an answer
EMBED_BATCH = 64
EVAL_BATCH = 32  # --eval questions answered, retrieved for and checked together
FLAGGED = 0.5  # --eval flags an answer when at most this share of its sentences is supported
SPLIT_BATCH, SPLIT_CHARS = 1000, 1_000_000  # rows (or characters) tokenized together before splitting
# Rows chunked, embedded and written at a time: the chunks and their vectors of one slice are
# in memory, not those of the whole build.
BUILD_SLICE = 5_000
# A refresh reuses vectors only when these options are the same as the previous version's.
INDEX_OPTIONS = ("embed", "chunk_size", "chunk_overlap")


# --- rows -> documents ---------------------------------------------------------------------
def columns_of(spec: RagSpec, rows) -> dict:
    """The id, text and metadata columns of ``rows`` (a ``data.RowFile``, typed by its Arrow
    schema, or a DataFrame) and the id type; a column that is not there raises here."""
    from ... import data

    if isinstance(rows, data.RowFile):
        import pyarrow as pa

        types = {str(f.name): f.type for f in rows.schema}
        is_text = lambda c: pa.types.is_string(types[c]) or pa.types.is_large_string(types[c])  # noqa: E731
        is_int = lambda c: pa.types.is_integer(types[c])  # noqa: E731
    else:
        import pandas as pd

        rows = rows.set_axis([str(c) for c in rows.columns], axis=1)
        is_text = lambda c: _is_text(rows[c])  # noqa: E731
        is_int = lambda c: pd.api.types.is_integer_dtype(rows[c])  # noqa: E731
    columns = [str(c) for c in rows.columns]
    if spec.id not in columns:
        raise NbCustomError(f"no id column {spec.id!r} in the query (columns: {', '.join(columns)}): name one with --id COL")
    metadata_cols = spec.columns("metadata")
    for col in metadata_cols:
        if col not in columns:
            raise NbCustomError(f"--metadata column {col!r} is not in the query (columns: {', '.join(columns)}): select it or change --metadata")
    text_cols = spec.columns("text")
    for col in text_cols:
        if col not in columns:
            raise NbCustomError(f"--text column {col!r} is not in the query (columns: {', '.join(columns)}): select it or change --text")
    if not text_cols:
        text_cols = [c for c in columns if c != spec.id and c not in metadata_cols and is_text(c)]
        if not text_cols:
            raise NbCustomError("no text column to index: select a text (VARCHAR) column or name it with --text COL")
    return {"id_column": spec.id, "id_type": "int" if is_int(spec.id) else "str", "text_columns": text_cols, "metadata_columns": metadata_cols}


def documents(spec: RagSpec, rows, chosen: dict | None = None) -> tuple[Any, dict]:
    """The rows (a DataFrame) as a frame of ``row_id``, ``text``, ``metadata`` (dict),
    ``hash``, plus the columns ``chosen`` (``columns_of`` them when not given). User
    mistakes raise here."""
    import pandas as pd

    chosen = chosen or columns_of(spec, rows)
    rows = rows.set_axis([str(c) for c in rows.columns], axis=1)
    text_cols, metadata_cols = chosen["text_columns"], chosen["metadata_columns"]
    ids = rows[spec.id]
    if ids.isna().any():
        raise NbCustomError(f"id column {spec.id!r} has NULL values: every row needs an id (filter them out or choose --id)")
    keys = ids.map(key)
    duplicated = keys[keys.duplicated()]
    if len(duplicated):
        raise _duplicate(spec, duplicated.iloc[0])

    texts = [_join(row, text_cols) for row in rows[text_cols].itertuples(index=False)]
    empty = [k for k, t in zip(keys, texts) if not t]
    if empty:
        raise NbCustomError(
            f"row {empty[0]!r} has no text (NULL or empty {', '.join(text_cols)}): filter such rows out with WHERE ... IS NOT NULL"
        )
    metadata = [
        {c: _plain(v) for c, v in zip(metadata_cols, values)} for values in rows[metadata_cols].itertuples(index=False)
    ] if metadata_cols else [{} for _ in texts]
    frame = pd.DataFrame({"row_id": keys.tolist(), "text": texts, "metadata": metadata})
    frame["hash"] = [content_hash(t, m) for t, m in zip(texts, metadata)]
    return frame, chosen


def _duplicate(spec: RagSpec, value) -> NbCustomError:
    return NbCustomError(f"id column {spec.id!r} has duplicate values (e.g. {value!r}): ids must be unique, choose another --id")


def content_hash(text: str, metadata: dict) -> str:
    """sha256 of a row's text and metadata: what decides whether it is embedded again."""
    return hashlib.sha256(json.dumps([text, metadata], sort_keys=True, default=str).encode()).hexdigest()


def key(value: Any) -> str | None:
    """A row id as the index stores it: text, with 3.0 (an int read through NULLs) as 3."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value)


def _is_text(series) -> bool:
    import pandas as pd

    if pd.api.types.is_string_dtype(series) and not pd.api.types.is_object_dtype(series):
        return True
    values = series.dropna()
    return pd.api.types.is_object_dtype(series) and len(values) > 0 and values.map(lambda v: isinstance(v, str)).all()


def _join(values: Sequence[Any], columns: Sequence[str]) -> str:
    """One column: its text. Several: ``column: text`` lines, so the LLM sees what is what."""
    parts = [(c, str(v).strip()) for c, v in zip(columns, values) if v is not None and not _missing(v) and str(v).strip()]
    if len(columns) == 1:
        return parts[0][1] if parts else ""
    return "\n".join(f"{c}: {v}" for c, v in parts)


def _missing(value: Any) -> bool:
    try:
        return bool(value != value)
    except (TypeError, ValueError):
        return False


def _plain(value: Any) -> Any:
    """A metadata value as JSON can hold it."""
    if value is None or _missing(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str):
        value = value.item()
    return value if isinstance(value, (str, int, float, bool)) else str(value)


# --- build / refresh ------------------------------------------------------------------------
def build(spec: RagSpec, rows, previous, build, display) -> Outcome:
    """Build the index from ``rows``, or refresh ``previous``: only new or changed rows are
    embedded, unchanged rows' vectors are copied, missing rows are dropped (kept with
    ``--append``).

    ``rows`` is the version's ``train.parquet`` as a ``data.RowFile`` (a DataFrame is written
    there first). It is read twice, BUILD_SLICE rows at a time: once for the ids and content
    hashes (every mistake in the rows fails then, before a model loads), once for the rows to
    embed, which are chunked, embedded and written a slice at a time."""
    from ... import data, models

    if not isinstance(rows, data.RowFile):
        rows = data.spool(rows, build.path / "train.parquet")
    chosen = columns_of(spec, rows)
    current: dict[str, str] = {}  # row id -> content hash
    for part in rows.batches(BUILD_SLICE):
        frame, _ = documents(spec, part, chosen)
        for row_id, row_hash in zip(frame["row_id"], frame["hash"]):
            if row_id in current:
                raise _duplicate(spec, row_id)
            current[row_id] = row_hash
    stores.check(spec.vector_store)  # an unreachable server fails now, before any model loads
    embed_path = models.resolve_embedding(spec.embed)
    models.resolve_llm(spec.llm)  # an unknown --llm fails now, not at the first question

    old_hashes = stores.row_hashes(previous) if previous is not None else {}
    display.phase("loading embedding model")
    embed_model = rag_models.embedder(embed_path, EMBED_BATCH)
    rag_models.use(embed_model)
    dim = rag_models.dimension(embed_model)
    writer = stores.create(spec.vector_store, previous, build.name, build.model_dir, dim)
    build.on_abort.append(writer.discard)  # a server table of a failed build is dropped

    same_options = previous is not None and all(previous.manifest.get("options", {}).get(o) == getattr(spec, o) for o in INDEX_OPTIONS)
    reuse = same_options and writer.can_copy
    added = [r for r in current if r not in old_hashes]
    changed = [r for r in current if r in old_hashes and old_hashes[r] != current[r]]
    unchanged = [r for r in current if old_hashes.get(r) == current[r]]
    missing = [r for r in old_hashes if r not in current]
    kept = missing if spec.append else []
    if kept and not reuse:
        raise NbCustomError("--append needs the same --embed, --chunk-size, --chunk-overlap and --vector-store as the previous version")
    to_embed = set(current) if not reuse else set(added) | set(changed)  # else every row is embedded again
    copied_rows = unchanged + kept if reuse else []
    del current, old_hashes  # not needed while the vectors are written

    display.phase("embedding")
    # bf16 autocast where the CPU multiplies bf16 natively (twice as fast, vectors within 1e-4
    # cosine of float32's: tests/benchmarks/RESULTS.md), else float32; questions stay float32
    run_on = llm_precision.choose("cpu")
    before_calls, done = EMBED_CALLS["documents"], 0
    for part in rows.batches(BUILD_SLICE):  # chunk, embed and write a slice of rows at a time
        part = part[part[spec.id].map(key).isin(to_embed).to_numpy()] if len(to_embed) < len(rows) else part
        if not len(part):
            continue
        frame, _ = documents(spec, part, chosen)
        chunks = split(frame, spec, embed_model)
        share, at = len(frame) / max(1, len(chunks)), done
        vectors = embed(embed_model, [c["embed_text"] for c in chunks], lambda n: display.step(at + round(n * share), len(to_embed)), run_on)
        writer.insert(chunks, vectors)
        done += len(frame)
    display.phase("writing vectors")
    copied = writer.copy(copied_rows) if copied_rows else 0
    entry, total = writer.finish()

    counts = {
        "added": len(added), "changed": len(changed), "removed": len(missing) - len(kept),
        "unchanged": len(unchanged), "embedded": len(to_embed), "chunks": int(total),
        "chunks_embedded": EMBED_CALLS["documents"] - before_calls, "chunks_copied": int(copied),
    }
    if kept:
        counts["kept"] = len(kept)
        _with_kept(rows.path, previous, chosen["id_column"], kept)
    notes = [
        f"{counts['embedded']} rows embedded ({counts['chunks_embedded']} chunks); "
        f"{counts['added']} added, {counts['changed']} changed, {counts['removed']} removed, {counts['unchanged']} unchanged"
        + (f", {len(kept)} kept (--append)" if kept else "")
    ]
    if to_embed:
        notes.append(f"embedded in {run_on.name} ({run_on.why})")
    if same_options and not reuse:
        notes.append(f"the vectors moved from v{previous.version}'s store to another: every row was embedded again")
    elif previous is not None and not reuse:
        notes.append(f"--embed or chunking differs from v{previous.version}: every row was embedded again")
    info = {
        "base": spec.llm or models.DEFAULT_LLM,
        "index": {**chosen, "embed_model": spec.embed or models.DEFAULT_EMBED, "dim": int(dim), "store": entry, "embed_precision": run_on.name},
    }
    import pandas as pd

    from ...display.charts import bar_chart

    refresh = {k: counts[k] for k in ("added", "changed", "removed", "unchanged", "embedded")}
    return Outcome(
        counts=counts, info=info, notes=notes,
        charts={"refresh": bar_chart(refresh, f"rows in this refresh ({counts['chunks']} chunks in the index)")},
        tables={"refresh": pd.DataFrame([{"rows": k, "count": v} for k, v in refresh.items()])},
    )


def split(frame, spec: RagSpec, embed_model) -> list[dict]:
    """Rows -> chunks as ``SentenceSplitter`` makes them (sizes in the embedding model's
    tokens). A row that fits in one chunk becomes that chunk here (``_whole``); only longer
    rows go through the splitter, whose objects cost more than the tokenizing (RESULTS.md)."""
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    tokenizer = _TokenCache(embed_model._model.tokenizer)
    splitter = SentenceSplitter(chunk_size=spec.chunk_size, chunk_overlap=spec.chunk_overlap, tokenizer=tokenizer)
    rows = list(frame.itertuples(index=False))
    texts: dict[str, list[tuple[str, str]]] = {}  # row id -> its chunks' (text, embed text)
    with rag_models.quiet():
        for part in _slices(rows):
            tokenizer.prefill([row.text for row in part])
            longer = []
            for row in part:
                whole = _whole(row.text, row.metadata, tokenizer, spec.chunk_size)
                if whole:
                    texts[row.row_id] = [whole]
                else:
                    longer.append(Document(id_=row.row_id, text=row.text, metadata=row.metadata))
            for node in splitter.get_nodes_from_documents(longer):
                texts.setdefault(node.ref_doc_id, []).append((node.text, node.get_content(metadata_mode=MetadataMode.EMBED)))
    return [
        {"chunk_id": f"{row.row_id}#{position}", "row_id": row.row_id, "position": position, "hash": row.hash,
         "text": text, "metadata": row.metadata, "embed_text": embed_text}
        for row in rows for position, (text, embed_text) in enumerate(texts.get(row.row_id, []))
    ]


def _whole(text: str, metadata: dict, tokenizer, chunk_size: int) -> tuple[str, str] | None:
    """(text, embed text) of the one chunk ``SentenceSplitter`` makes of a row whose text and
    metadata header fit in ``chunk_size`` tokens, with llama-index's default templates; None
    where the splitter has more to do (a longer row, an empty text, a header near the size)."""
    from llama_index.core.schema import DEFAULT_METADATA_TMPL, DEFAULT_TEXT_NODE_TMPL

    header = "\n".join(DEFAULT_METADATA_TMPL.format(key=k, value=str(v)) for k, v in metadata.items())
    room = chunk_size - len(tokenizer(header))
    if not text.strip() or room < 50 or len(tokenizer(text)) > room:
        return None
    text = text.strip()
    return text, DEFAULT_TEXT_NODE_TMPL.format(metadata_str=header, content=text).strip() if header else text


def _slices(rows: list) -> Iterator[list]:
    """``rows`` in order, at most SPLIT_BATCH rows or about SPLIT_CHARS characters at a time."""
    part, size = [], 0
    for row in rows:
        if part and (len(part) >= SPLIT_BATCH or size + len(row.text) > SPLIT_CHARS):
            yield part
            part, size = [], 0
        part.append(row)
        size += len(row.text)
    if part:
        yield part


class _TokenCache:
    """The embedding model's tokenizer as the splitter calls it (one text -> token ids, no
    special tokens), answered from one batched call per slice of rows: each row's text is
    measured before it is split, and repeated strings (the metadata header) once per slice."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._known: dict[str, list[int]] = {}

    def prefill(self, texts: list[str]) -> None:
        self._known = dict(zip(texts, self._tokenizer(texts, add_special_tokens=False)["input_ids"])) if texts else {}

    def __call__(self, text: str) -> list[int]:
        ids = self._known.get(text)
        if ids is None:
            ids = self._known[text] = self._tokenizer.encode(text, add_special_tokens=False)
        return ids


def embed(embed_model, texts: list[str], progress=None, run_on=None):
    """Embedding vectors of ``texts`` (in their order), a batch at a time, under ``run_on``'s
    autocast (a ``precision.Precision``; None: float32); ``progress(n)`` after each batch.

    Texts are embedded longest first (by characters, as sentence-transformers sorts within
    one call), so each batch holds texts of similar length and little compute goes to padding;
    the rows of the result are put back in the order of ``texts``."""
    import numpy as np

    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = []  # float32 batches: a batch's Python floats are dropped at once
    for start in range(0, len(texts), EMBED_BATCH):
        with rag_models.quiet(), run_on.autocast() if run_on else contextlib.nullcontext():
            out.append(np.asarray(embed_model.get_text_embedding_batch([texts[i] for i in order[start : start + EMBED_BATCH]]), dtype=np.float32))
        if progress:
            progress(min(start + EMBED_BATCH, len(texts)))
    vectors = np.empty((len(texts), out[0].shape[1] if out else 0), dtype=np.float32)
    if out:
        vectors[order] = np.concatenate(out)
    return vectors


def _with_kept(path, previous, id_column: str, kept: list[str]) -> None:
    """Add the previous version's rows that ``--append`` kept to the new rows' file ``path``
    (read whole: the one step of a build that holds every row)."""
    import pandas as pd

    old_file = previous.path / "train.parquet"
    if not old_file.exists():
        return
    old = pd.read_parquet(old_file).drop(columns="content_hash", errors="ignore")  # saved by versions before 2026-12-04
    old = old[old[id_column].map(key).isin(set(kept))]
    pd.concat([pd.read_parquet(path), old], ignore_index=True).to_parquet(path, index=False)


# --- using an index --------------------------------------------------------------------------
def load(version) -> "RagIndex":
    """The index of a committed version, ready to answer (models load on the first question)."""
    return RagIndex(version)


class RagIndex:
    """A committed index version: ``ask``, ``predict``, ``evaluate`` and ``retrieve``.

    ``as_llama_index()`` gives the llama-index ``VectorStoreIndex`` over the same vectors,
    for llama-index's own retrievers and query engines.
    """

    rowwise = True  # each row's answer depends on that row alone: %%predict --into streams

    def __init__(self, version):
        self.version = version
        self.options = version.manifest.get("options", {})
        self.info = version.manifest.get("index", {})
        self.top_k = int(self.options.get("top_k") or 4)
        self.max_new_tokens = int(self.options.get("max_new_tokens") or 96)
        self.search = self.options.get("search") or RagSpec().search
        self.answers = self.options.get("answers") or RagSpec().answers
        self.vectors = stores.open(version)
        self._index = None
        self._keywords = None
        self._embed_model = None

    def __repr__(self) -> str:
        return f"RagIndex({self.version.name}@{self.version.version}, {len(self.vectors)} chunks)"

    # --- models ------------------------------------------------------------------------
    def embed_model(self):
        from ... import models

        if self._embed_model is None:  # resolved once: a lookup of the package costs as much as a search
            self._embed_model = rag_models.embedder(models.resolve_embedding(self.options.get("embed")), EMBED_BATCH)
        return self._embed_model

    def llm(self, max_new_tokens: int | None = None, model: str | None = None):
        llm = rag_models.answerer(model or self.options.get("llm"), max_new_tokens or self.max_new_tokens)
        rag_models.use(self.embed_model(), llm)
        return llm

    def as_llama_index(self):
        """A llama-index ``VectorStoreIndex`` over this version's vectors (read-only)."""
        if self._index is None:
            from llama_index.core import VectorStoreIndex

            embed_model = self.embed_model()
            rag_models.use(embed_model)
            self._index = VectorStoreIndex.from_vector_store(stores.vector_store(self.vectors), embed_model=embed_model)
        return self._index

    # --- retrieval and answers ---------------------------------------------------------
    def keywords(self):
        """The BM25 index over this version's chunks (built on first use)."""
        if self._keywords is None:
            self._keywords = rag_search.Keywords(self.vectors.texts)
        return self._keywords

    def retrieve(self, questions: Sequence[str], top_k: int | None = None, search: str | None = None, where: str | None = None) -> list[list[dict]]:
        """For each question, its ``top_k`` sources (id, score, snippet, metadata, text),
        ranked by ``search`` (vector, keyword or hybrid) among the chunks whose metadata
        satisfies the SQL predicate ``where``."""
        mode = rag_search.check_mode(search or self.search)
        among = rag_search.where(self.vectors, where, self.info.get("metadata_columns", [])) if where else None
        embed_model = self.embed_model()
        keywords = self.keywords() if mode != "vector" else None
        queries = embed_model.query_embeddings(list(questions))
        out = []
        for question, query in zip(questions, queries):
            hits = rag_search.rank(self.vectors, keywords, query, question, top_k or self.top_k, mode, among)
            out.append([self._source(i, scores) for i, scores in hits])
        return out

    def _source(self, i: int, scores: dict) -> dict:
        from llama_index.core.schema import MetadataMode, TextNode

        row_id, metadata = self.vectors.row_ids[i], self.vectors.metadata(i)
        return {
            "id": int(row_id) if self.info.get("id_type") == "int" else row_id,
            **{name: round(float(score), 4) for name, score in scores.items()},
            "snippet": _snippet(self.vectors.texts[i]),
            "metadata": metadata,
            # what the LLM reads: llama-index's rendering of the chunk with its metadata
            "text": TextNode(text=self.vectors.texts[i], metadata=metadata).get_content(metadata_mode=MetadataMode.LLM),
        }

    def reader(self, llm=None):
        """What generates answers: ``llm`` when it is a reader (a ``%%finetune``d version's
        generator), else the answering model named ``llm`` or the index's own."""
        if llm is not None and not isinstance(llm, str):
            return rag_answers.TunedReader(llm)
        return rag_answers.Reader(self.llm(model=llm))

    def answer(self, questions: Sequence[str], sources: Sequence[list[dict]] | None, max_new_tokens=None, progress=None, llm=None, mode=None) -> list[str]:
        """Greedy answers: from the sources when given (as ``mode`` says), else from the LLM alone."""
        if sources is None:
            return self.reader(llm).generate([rag_answers.alone(q) for q in questions], max_new_tokens or self.max_new_tokens, progress)
        mode = mode or self.answers
        if mode == "extractive":
            copied = [rag_answers.extract(q, found) for q, found in zip(questions, sources)]
            if progress:
                progress(len(copied))
            return copied
        turns = [rag_answers.with_context(q, found) for q, found in zip(questions, sources)]
        answers = self.reader(llm).generate(turns, max_new_tokens or self.max_new_tokens, progress)
        if mode == "grounded":
            answers = [rag_answers.grounded(a, q, found) for a, q, found in zip(answers, questions, sources)]
        return answers

    def prompts(self, rows, top_k: int | None = None, search: str | None = None, where: str | None = None):
        """``rows`` (``question``, ``answer``) as fine-tuning rows for a reader: ``system``,
        ``prompt`` (what ``ask`` sends the model for the question) and ``response`` (the
        reference answer)."""
        import pandas as pd

        column = _question_column(rows, "rag_prompts")
        if "answer" not in rows.columns:
            raise NbCustomError("rag_prompts needs an `answer` column with the reference answers (SELECT ... AS answer)")
        questions = [str(q) for q in rows[column]]
        sources = self.retrieve(questions, top_k, search, where)
        turns = [rag_answers.with_context(q, found) for q, found in zip(questions, sources)]
        return pd.DataFrame(
            {"question": questions, "system": [t[0] for t in turns], "prompt": [t[1] for t in turns], "response": [str(a) for a in rows["answer"]]}
        )

    def ask(self, questions: Sequence[str], top_k: int | None = None, max_new_tokens: int | None = None, search=None, where=None, llm=None,
            answers=None):
        """A DataFrame of ``question``, ``answer``, ``faithfulness`` (the share of the answer's
        sentences its sources support) and ``sources`` (id, score, snippet, metadata)."""
        import pandas as pd

        questions = list(questions)
        sources = self.retrieve(questions, top_k, search, where)
        said = self.answer(questions, sources, max_new_tokens, llm=llm, mode=answers)
        frame = pd.DataFrame(
            {"question": questions, "answer": said, "faithfulness": [_faithfulness(a, s) for a, s in zip(said, sources)],
             "sources": [_public(s) for s in sources]}
        )
        frame.attrs["search"] = search or self.search  # what the sources' score is
        return frame

    def predict(self, rows, top_k: int | None = None, max_new_tokens: int | None = None, search=None, where=None, answers=None):
        """``rows`` with ``prediction`` (the answer to its ``question``), ``faithfulness`` and ``sources``."""
        column = _question_column(rows, "%%predict on a RAG index")
        questions = [str(q) for q in rows[column]]
        asked = self.ask(questions, top_k=top_k, max_new_tokens=max_new_tokens, search=search, where=where, answers=answers)
        result = rows.copy()
        for out, source in (("prediction", "answer"), ("faithfulness", "faithfulness"), ("sources", "sources")):
            result[out] = asked[source].to_numpy()
        return result

    def evaluate(self, rows, display, top_k: int | None = None, max_new_tokens: int | None = None, search=None, where=None, llm=None,
                 answers=None) -> Outcome:
        """The LLM alone (before) against the LLM with retrieval (after), on ``rows`` with
        ``question``, ``answer`` and optional ``source_id`` (one row id, or a list of them).

        Both sides get ``answer_f1`` (token F1 with the reference answer),
        ``answer_contains`` (share of answers that contain the normalized reference) and
        ``faithfulness`` (mean share of an answer's sentences that the retrieved chunks
        support; the LLM alone is held to the same chunks). The examples table has each
        answer's faithfulness, its unsupported sentences, and ``flagged`` where at least
        half of them are unsupported.
        Only the after side has the retrieval metrics over the K retrieved chunks' rows:
        ``hit_rate@K`` (a source row is among them), ``mrr`` (mean 1/rank of the first source
        row, 0 when not retrieved), ``recall@K`` (share of the source rows retrieved) and
        ``ndcg@K`` (ranked gain, 1 when the source rows come first): the LLM alone retrieves
        nothing, so those metrics do not exist before. They are computed over the rows that
        have a ``source_id`` and left out when none has. Both sides use the same reader.
        """
        import pandas as pd

        from ...evaluate import contains, mean, ndcg, recall, token_f1

        column = _question_column(rows, "--eval")
        if "answer" not in rows.columns:
            raise NbCustomError("the --eval query needs an `answer` column with the reference answers (SELECT ... AS answer)")
        k = top_k or self.top_k
        mode = rag_search.check_mode(search or self.search)
        if where:  # a bad predicate fails now, not after the answers without retrieval
            rag_search.where(self.vectors, where, self.info.get("metadata_columns", []))
        questions = [str(q) for q in rows[column]]
        references = ["" if _missing(a) or a is None else str(a) for a in rows["answer"]]
        relevant = [_relevant(s) for s in rows["source_id"]] if "source_id" in rows.columns else [[]] * len(rows)
        total = len(questions)

        # EVAL_BATCH questions at a time: answered alone, retrieved for, answered with their
        # chunks and checked, so only one batch's chunks are held
        before, after, faithful_before, checked, retrieved = [], [], [], [], []
        display.phase("answering without and with retrieval")
        for start in range(0, total, EVAL_BATCH):
            batch = questions[start : start + EVAL_BATCH]
            said = self.answer(batch, None, max_new_tokens, llm=llm)
            sources = self.retrieve(batch, k, mode, where)
            with_sources = self.answer(batch, sources, max_new_tokens, llm=llm, mode=answers)
            before += said
            after += with_sources
            faithful_before += [_faithfulness(a, found) for a, found in zip(said, sources)]
            checked += [rag_faithfulness.check(a, [s["text"] for s in found]) for a, found in zip(with_sources, sources)]
            retrieved += [list(dict.fromkeys(str(s["id"]) for s in found)) for found in sources]
            display.step(start + len(batch), total)
        faithful = [sum(ok for _, ok in c) / len(c) if c else None for c in checked]

        ranks = [next((n for n, r in enumerate(found, 1) if r in rel), None) if rel else None for rel, found in zip(relevant, retrieved)]
        scored = [i for i, rel in enumerate(relevant) if rel]

        def side(said, faithful):
            return {
                "answer_f1": mean(token_f1(a, r) for a, r in zip(said, references)),
                "answer_contains": mean(contains(a, r) for a, r in zip(said, references)),
                "faithfulness": mean(f for f in faithful if f is not None),
            }

        after_metrics = side(after, faithful)
        if scored:
            after_metrics[f"hit_rate@{k}"] = mean(1.0 if ranks[i] else 0.0 for i in scored)
            after_metrics["mrr"] = mean(1.0 / ranks[i] if ranks[i] else 0.0 for i in scored)
            after_metrics[f"recall@{k}"] = mean(recall(retrieved[i], relevant[i]) for i in scored)
            after_metrics[f"ndcg@{k}"] = mean(ndcg(retrieved[i], relevant[i]) for i in scored)
        examples = pd.DataFrame(
            {
                "question": questions, "reference": references, "before": before, "after": after,
                "faithfulness": faithful,
                "flagged": [f is not None and f <= FLAGGED for f in faithful],
                "unsupported": [" | ".join(s for s, ok in c if not ok) for c in checked],
                "source_id": [",".join(rel) if rel else None for rel in relevant], "retrieved": retrieved,
                "hit": [None if not rel else bool(rank) for rel, rank in zip(relevant, ranks)],
                "rank": pd.array(ranks, dtype="Int64"),
            }
        )
        reader = "" if llm is None else f", reader {llm if isinstance(llm, str) else self.reader(llm)!r}"
        return Outcome(
            before=side(before, faithful_before), after=after_metrics, examples=examples,
            before_label="LLM alone", after_label=f"with retrieval (top {k}, {mode})",
            notes=[f"{total} questions; retrieval metrics over the {len(scored)} with a source_id"
                   + (f"; only chunks where {where}" if where else "") + reader],
        )


def _faithfulness(answer: str, sources: list[dict]) -> float | None:
    return rag_faithfulness.faithfulness(answer, [s["text"] for s in sources])


def _relevant(value) -> list[str]:
    """The row ids of a ``source_id`` value: one id, or a list of them (a DuckDB LIST)."""
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist") and not isinstance(value, str) and getattr(value, "ndim", 0):
        return [k for k in map(key, list(value)) if k is not None]
    found = key(value)
    return [found] if found is not None else []


def _question_column(rows, where: str) -> str:
    if "question" not in rows.columns:
        raise NbCustomError(f"{where} needs a `question` column (columns: {', '.join(map(str, rows.columns))}): SELECT ... AS question")
    return "question"


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SNIPPET else text[: SNIPPET - 1] + "…"


def _public(sources: list[dict]) -> list[dict]:
    """Sources as users see them: without the full prompt text."""
    return [{k: v for k, v in s.items() if k != "text"} for s in sources]
