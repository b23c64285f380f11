"""%%rag: build, incremental refresh, answers with sources, before/after evaluation and
%%predict on an index, with the real embedding model, llama-index, DuckDB and the embedded
LLM, on invented facts no model can know."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import nbcustom
from nbcustom.errors import NbCustomError
from nbcustom.store import Store

from conftest import snapshot
from rag_facts import FACTS, QUESTIONS, facts_frame, questions_frame

AGENTS = ["Abel", "Brix", "Cato", "Dima", "Esko", "Fenna", "Gorm", "Hale", "Ines", "Jory",
          "Kasimir", "Lotte", "Mads", "Nyla", "Orrin", "Pell", "Quade", "Runa", "Sten", "Tove"]
FIFTY = FACTS + [(31 + i, f"Agent {name} keeps locker number {100 + 7 * i}.", "lockers") for i, name in enumerate(AGENTS)]


def embedded_documents() -> int:
    from nbcustom.engines.rag import models as rag_models

    return rag_models.EMBED_CALLS["documents"]


def ids(sources) -> list:
    return [s["id"] for s in sources]


# --- rows -> documents (no model) ---------------------------------------------------------
def test_rows_become_documents_with_ids_text_metadata_and_content_hashes():
    from nbcustom.engines.rag.index import documents
    from nbcustom.specs import RagSpec

    rows = pd.DataFrame({"id": [1, 2], "title": ["Vault", "Mayor"], "body": ["Code QX-4471.", "Talia Brennick."],
                         "topic": ["security", "people"], "stars": [3, 4]})
    frame, chosen = documents(RagSpec.from_options(metadata="topic"), rows)
    # default text: every text column but the id and metadata ones, labelled when several
    assert chosen["text_columns"] == ["title", "body"] and chosen["id_type"] == "int"
    assert frame["row_id"].tolist() == ["1", "2"]
    assert frame["text"][0] == "title: Vault\nbody: Code QX-4471."
    assert frame["metadata"][1] == {"topic": "people"}
    again, _ = documents(RagSpec.from_options(metadata="topic"), rows)
    assert again["hash"].tolist() == frame["hash"].tolist()  # stable
    rows.loc[1, "topic"] = "mayors"  # a metadata change is a content change
    changed, _ = documents(RagSpec.from_options(metadata="topic"), rows)
    assert changed["hash"][0] == frame["hash"][0] and changed["hash"][1] != frame["hash"][1]
    one, chosen = documents(RagSpec.from_options(text="body"), rows)
    assert one["text"][0] == "Code QX-4471." and chosen["metadata_columns"] == []


def test_chunks_are_the_sentence_splitters_whether_a_row_fits_one_chunk_or_not():
    """``split`` makes a row that fits in one chunk itself and leaves the rest to llama-index's
    ``SentenceSplitter``: every chunk's text and embedded text equal the splitter's own."""
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.schema import MetadataMode

    from nbcustom.engines.rag import models as rag_models
    from nbcustom.engines.rag.index import documents, split
    from nbcustom.specs import RagSpec

    embed_model = rag_models.embedder(None)
    tokens = embed_model._model.tokenizer
    words = [f"word{i}" for i in range(200)]
    sizes = {n: " ".join(words[:n]) for n in range(1, 120)}
    fits = {len(tokens(t, add_special_tokens=False)["input_ids"]): t for t in sizes.values()}  # text by its token count
    texts = ["A short note about bread.", "  Padded on both sides.\n\n", "One.\n\nTwo paragraphs."]
    texts += [fits[n] for n in sorted(fits) if 40 <= n <= 70]  # around the room a 64-token chunk leaves
    texts += [" ".join(f"Sentence {i} tells of the {w} keeper." for i, w in enumerate(words[:40]))]  # several chunks
    for metadata in ("topic", None):
        rows = pd.DataFrame({"id": range(len(texts)), "text": texts, "topic": ["bakery"] * (len(texts) - 1) + ["a long topic " * 4]})
        spec = RagSpec.from_options(text="text", chunk_size=64, chunk_overlap=8, **({"metadata": metadata} if metadata else {}))
        frame, _ = documents(spec, rows)
        splitter = SentenceSplitter(chunk_size=64, chunk_overlap=8, tokenizer=lambda t: tokens(t, add_special_tokens=False)["input_ids"])
        nodes = splitter.get_nodes_from_documents([Document(id_=r.row_id, text=r.text, metadata=r.metadata) for r in frame.itertuples()])
        expected = [(n.ref_doc_id, n.text, n.get_content(metadata_mode=MetadataMode.EMBED)) for n in nodes]
        chunks = split(frame, spec, embed_model)
        assert [(c["row_id"], c["text"], c["embed_text"]) for c in chunks] == expected
        assert len(expected) > len(texts) and [c["position"] for c in chunks if c["row_id"] == frame["row_id"].iloc[-1]][-1] > 0


# --- bad input -------------------------------------------------------------------------------
BAD = {
    "no text column": ("SELECT id, id * 2 AS n FROM facts", "", "no text column"),
    "duplicate ids": ("SELECT id % 3 AS id, fact FROM facts", "", "duplicate"),
    "NULL text": ("SELECT id, CASE WHEN id = 4 THEN NULL ELSE fact END AS fact FROM facts", "", "no text"),
    "missing id": ("SELECT fact FROM facts", "", "--id"),
    "unknown --text": ("SELECT * FROM facts", "--text body", "--text column 'body'"),
    "a type Parquet cannot hold": ("SELECT *, INTERVAL 1 DAY AS wait FROM facts", "", "CAST(col AS VARCHAR)"),
    "eval without question": ("SELECT answer, source_id FROM questions", "--eval", "`question` column"),
    "eval without answer": ("SELECT question FROM questions", "--eval", "`answer` column"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_error_and_leaves_the_store_unchanged(ip, store_dir, case):
    sql, flags, message = BAD[case]
    ip.user_ns["facts"] = facts_frame()
    ip.user_ns["questions"] = questions_frame()
    if flags == "--eval":
        ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    state = snapshot(store_dir)
    with pytest.raises(NbCustomError) as error:
        ip.run_cell_magic("rag", f"facts {flags}", sql)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert snapshot(store_dir) == state
    assert nbcustom.connection().execute("SELECT 42").fetchall() == [(42,)]  # no result left open on the kernel's connection


def test_ask_without_questions_and_predict_without_question_column(ip, store_dir):
    ip.user_ns["facts"] = facts_frame()
    ip.run_cell_magic("rag", "facts", "SELECT * FROM facts")
    state = snapshot(store_dir)
    with pytest.raises(NbCustomError, match="no question"):
        ip.run_cell_magic("rag", "facts --ask", "\n  \n")
    with pytest.raises(NbCustomError, match="`question` column"):
        ip.run_cell_magic("predict", "facts", "SELECT fact FROM facts")
    with pytest.raises(NbCustomError, match="is a RAG index"):
        nbcustom.finetune("facts", "SELECT 1 AS prompt, 2 AS response", store=store_dir)
    assert snapshot(store_dir) == state


# --- refresh -------------------------------------------------------------------------------
def test_refresh_embeds_only_new_and_changed_rows_and_forgets_removed_ones(ip, store_dir):
    ip.user_ns["facts"] = facts_frame(FIFTY)
    ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    index = nbcustom.load("facts", store=store_dir)
    tower = "What is the tallest tower in Dunmarrow?"
    assert ids(index.retrieve([tower], 3)[0])[0] == 7

    rows = [r for r in FIFTY if r[0] != 7]  # removed
    rows = [(5, "The inventor of the glimmerwheel was Pia Lorrent.", "people") if r[0] == 5 else r for r in rows]  # changed
    rows.append((51, "The harbor master of Port Ellisande is Gunnar Vey.", "people"))  # added
    ip.user_ns["facts"] = facts_frame(rows)
    start = embedded_documents()
    ip.run_cell_magic("rag", "facts --metadata topic", "SELECT * FROM facts")
    embedded = embedded_documents() - start

    v2 = Store(store_dir).get("facts")
    counts = v2.manifest["counts"]
    assert (v2.version, counts["added"], counts["changed"], counts["removed"], counts["unchanged"]) == (2, 1, 1, 1, 48)
    assert counts["embedded"] == 2 and counts["chunks_embedded"] == embedded == 2
    assert counts["chunks"] == 50 and counts["chunks_copied"] == 48
    index = nbcustom.load("facts", store=store_dir)
    assert 7 not in ids(index.retrieve([tower], 10)[0])
    assert all(s["id"] != 7 for found in index.retrieve([f[1] for f in FACTS], 5) for s in found)
    assert "Pia Lorrent" in index.retrieve(["Who invented the glimmerwheel?"], 1)[0][0]["snippet"]
    assert ids(index.retrieve(["Who is the harbor master of Port Ellisande?"], 1)[0]) == [51]
    saved = pd.read_parquet(v2.path / "train.parquet")
    assert len(saved) == 50 and saved.columns.tolist() == ["id", "fact", "topic"]  # the rows as the query read them

    # --append keeps rows missing from the query; the same rows again embed nothing
    start = embedded_documents()
    ip.run_cell_magic("rag", "facts --metadata topic --append", "SELECT * FROM facts WHERE id <= 10")
    counts = Store(store_dir).get("facts").manifest["counts"]
    assert embedded_documents() == start
    assert (counts["embedded"], counts["removed"], counts["kept"], counts["chunks"]) == (0, 0, 41, 50)
    assert len(pd.read_parquet(Store(store_dir).get("facts").path / "train.parquet")) == 50  # 9 read, 41 kept
    # another chunking re-embeds everything (vectors of other chunks cannot be reused)
    ip.run_cell_magic("rag", "facts --metadata topic --chunk-size 256", "SELECT * FROM facts")
    assert Store(store_dir).get("facts").manifest["counts"]["embedded"] == 50


# --- answers and evaluation (the embedded LLM) ----------------------------------------------
@pytest.mark.slow
def test_a_build_reads_the_query_a_batch_at_a_time(ip, store_dir, monkeypatch):
    """The query's rows go from DuckDB's Arrow record batches into the version's
    train.parquet and come back BUILD_SLICE rows at a time: no step holds the whole query,
    ids are unique across slices, and an integer column with NULLs in some slices reads as
    integers in all of them."""
    from nbcustom import data
    from nbcustom.engines.rag import index as rag_index

    monkeypatch.setattr(data, "SPOOL_BATCH", 7)
    monkeypatch.setattr(rag_index, "BUILD_SLICE", 10)
    seen = []
    monkeypatch.setattr(rag_index, "documents", lambda spec, rows, chosen=None, documents=rag_index.documents:
                        seen.append(len(rows)) or documents(spec, rows, chosen))
    monkeypatch.setattr(data, "to_pandas", lambda *a, **k: pytest.fail("the whole query was read into one frame"))
    ip.user_ns["facts"] = facts_frame(FIFTY)
    ip.run_cell_magic("rag", "facts --metadata topic,n", "SELECT *, CASE WHEN id % 4 = 0 THEN NULL ELSE id END AS n FROM facts")
    assert max(seen) == 10 and sum(seen) == 2 * 50  # read for the hashes, then for the embedding
    v1 = Store(store_dir).get("facts")
    assert len(pd.read_parquet(v1.path / "train.parquet")) == 50 and v1.manifest["data"]["rows"] == 50
    index = nbcustom.load("facts", store=store_dir)
    numbers = [index.vectors.metadata(i)["n"] for i in range(len(index.vectors))]
    assert all(type(n) is int for n in numbers if n is not None) and numbers.count(None) == 12
    assert ids(index.retrieve(["What is the tallest tower in Dunmarrow?"], 1)[0]) == [7]

    state = snapshot(store_dir)  # a duplicate id in another slice than its first
    with pytest.raises(NbCustomError, match="duplicate values") as error:
        ip.run_cell_magic("rag", "facts", "SELECT id % 40 AS id, fact FROM facts")
    assert "\n" not in str(error.value) and snapshot(store_dir) == state


def test_eval_with_retrieval_beats_the_llm_alone_offline_without_api_keys(ip, store_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("OPENAI_API_KEY", "OPENAI_API_BASE", "ANTHROPIC_API_KEY", "HF_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    ip.user_ns["facts"] = facts_frame()
    ip.user_ns["questions"] = questions_frame()
    ip.run_cell_magic("rag", "facts --metadata topic --top-k 3 --max-new-tokens 24", "SELECT * FROM facts")

    capsys.readouterr()
    ip.run_cell_magic("rag", "facts --ask", "What is the access code of the Vormund vault?\n\nWho is the mayor of Quenville?\n")
    shown = capsys.readouterr().out
    assert shown.count("Q: ") == 2 and "QX-4471" in shown and "[1] 1 (" in shown  # answer and its source
    assert "faithfulness 1.00" in shown and "vector 0." in shown and "keyword " in shown  # hybrid: both parts beside the fused score

    from nbcustom.engines.rag import index as rag_index

    monkeypatch.setattr(rag_index, "EVAL_BATCH", 4)  # the questions answered, retrieved for and checked 4 at a time
    ip.run_cell_magic("rag", "facts --eval", "SELECT * FROM questions")
    version = Store(store_dir).get("facts")  # checksums verified after the eval rewrote the manifest
    before, after = version.manifest["metrics"]["before"], version.manifest["metrics"]["after"]
    assert after["hit_rate@3"] >= 0.8 and after["mrr"] >= 0.7
    assert after["answer_contains"] >= before["answer_contains"] + 0.5
    assert after["answer_f1"] > before["answer_f1"]
    assert "hit_rate@3" not in before  # the LLM alone retrieves nothing
    assert after["faithfulness"] >= 0.9 and before["faithfulness"] < 0.6  # the LLM alone invents what the sources do not say
    examples = pd.read_parquet(version.path / "eval.parquet")
    assert list(examples.columns) == [
        "question", "reference", "before", "after", "faithfulness", "flagged", "unsupported", "source_id", "retrieved", "hit", "rank",
    ]
    assert examples["question"].tolist() == [q for q, *_ in QUESTIONS] and examples["hit"].mean() == after["hit_rate@3"]
    assert examples["faithfulness"].mean() == pytest.approx(after["faithfulness"])

    from llama_index.core import Settings

    from nbcustom.engines.rag import models as rag_models

    # llama-index's defaults are the local models, never a hosted API
    assert type(Settings.llm).__name__ == "LocalLLM" and "Counting" in type(Settings.embed_model).__name__
    assert isinstance(Settings.llm, rag_models._llm_class())


@pytest.mark.slow
def test_predict_appends_answers_and_sources_and_streams_many_rows_into_a_table(ip, store_dir, monkeypatch):
    from nbcustom.engines.rag.index import RagIndex

    ip.user_ns["facts"] = facts_frame()
    ip.run_cell_magic("rag", "facts --top-k 2 --max-new-tokens 24", "SELECT * FROM facts")
    result = ip.run_cell_magic(
        "predict", "facts --into answers",
        "SELECT 'Who is the chef of the Saffron Owl restaurant?' AS question, 7 AS ticket",
    )
    assert list(result.columns) == ["question", "ticket", "prediction", "faithfulness", "sources"]
    assert "Bettany Kroll" in result["prediction"][0]
    assert [s["id"] for s in result["sources"][0]][0] == 16 and len(result["sources"][0]) == 2
    assert set(result["sources"][0][0]) == {"id", "score", "vector_score", "keyword_score", "snippet", "metadata"}
    stored = nbcustom.connection().execute("SELECT prediction FROM answers").fetchall()
    assert stored == [(result["prediction"][0],)]

    # 600 questions: predicted 256 rows at a time, each part written as it is made
    con = nbcustom.connection()
    con.execute("CREATE OR REPLACE TABLE many AS SELECT i, CASE WHEN i % 2 = 0 THEN 'Who is the chef of the Saffron Owl restaurant?' "
                "ELSE 'What is the access code of the Vormund vault?' END AS question FROM range(600) t(i)")
    sizes, real = [], RagIndex.predict

    def counted(self, rows, **options):
        sizes.append(len(rows))
        if len(sizes) == fail_at:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        return real(self, rows, **options)

    monkeypatch.setattr(RagIndex, "predict", counted)
    monkeypatch.setattr(nbcustom.api, "KEEP", 500)  # more rows than that: only the first 10 come back
    fail_at = None
    shown = ip.run_cell_magic("predict", "facts --into answers --answers extractive", "SELECT * FROM many ORDER BY i")
    assert sizes == [256, 256, 88] and shown.attrs["rows"] == 600 and shown["i"].tolist() == list(range(10))
    stored = con.execute("SELECT i, prediction, sources[1].id FROM answers ORDER BY i").fetchall()
    assert [i for i, _, _ in stored] == list(range(600))
    assert all(("Kroll" in said and first == 16) if i % 2 == 0 else ("QX-4471" in said and first == 1) for i, said, first in stored)

    sizes.clear()
    fail_at = 2
    with pytest.raises(KeyboardInterrupt):
        ip.run_cell_magic("predict", "facts --into answers --answers extractive", "SELECT i, 'Who runs Quenville?' AS question FROM many")
    assert con.execute("SELECT count(*), count(DISTINCT question) FROM answers").fetchone() == (600, 2)  # the old table, whole
    assert con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name LIKE '__nbcustom%'").fetchone() == (0,)


@pytest.mark.slow
def test_index_reloads_in_a_fresh_process_without_embedding_again(tmp_path):
    store = tmp_path / "store"
    nbcustom.rag("facts", facts_frame(), store=store, ui="none", top_k=2, max_new_tokens=24)
    questions = [QUESTIONS[0][0], QUESTIONS[4][0]]
    here = nbcustom.ask("facts", questions, store=store)

    script = textwrap.dedent(
        f"""
        import json, nbcustom
        from nbcustom.engines.rag import models as rag_models
        answers = nbcustom.ask("facts", {questions!r}, store={str(store)!r})
        print(json.dumps({{"answers": answers["answer"].tolist(), "sources": [[s["id"] for s in f] for f in answers["sources"]],
                          "calls": rag_models.EMBED_CALLS}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["HF_HUB_OFFLINE"] = "1"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["calls"] == {"documents": 0, "queries": 2}  # only the questions were embedded
    assert there["answers"] == here["answer"].tolist()
    assert there["sources"] == [[s["id"] for s in f] for f in here["sources"]]


def test_answers_render_as_html_and_text():
    from nbcustom.display.answers import answers_html, answers_text

    frame = pd.DataFrame({
        "question": ["Who is the mayor of <Quenville>?"], "answer": ["Talia Brennick"],
        "sources": [[{"id": 2, "score": 0.71234, "snippet": "Talia Brennick is the mayor", "metadata": {}}]],
    })
    html = answers_html(frame)
    assert "&lt;Quenville&gt;" in html and "<td>2</td>" in html and "0.7123" in html
    assert answers_text(frame).splitlines() == [
        "Q: Who is the mayor of <Quenville>?", "A: Talia Brennick", "  [1] 2 (0.7123) Talia Brennick is the mayor",
    ]
    from nbcustom.display.answers import scores_chart

    assert scores_chart(frame).startswith(b"\x89PNG")
    assert scores_chart(frame.assign(sources=[[]])) is None


def test_long_rows_are_split_into_chunks_that_cite_their_row(ip, store_dir):
    story = " ".join(f"Chapter {n} of the Orlan saga tells of the {word} keeper." for n, word in
                     enumerate(["amber", "basalt", "cobalt", "dune", "ember", "frost", "garnet", "harbor", "indigo", "jade"] * 3))
    story += " In the last chapter the keeper hides the Verdigris Crown under the old mill of Saltmere."
    ip.user_ns["books"] = pd.DataFrame({"id": ["saga", "note"], "text": [story, "A short note about bread."]})
    ip.run_cell_magic("rag", "books --chunk-size 64 --chunk-overlap 8", "SELECT * FROM books")
    counts = Store(store_dir).get("books").manifest["counts"]
    assert counts["chunks"] > 5 and counts["chunks"] == counts["chunks_embedded"]
    found = nbcustom.load("books", store=store_dir).retrieve(["Where is the Verdigris Crown hidden?"], 1)[0][0]
    assert found["id"] == "saga" and "Saltmere" in found["snippet"]
