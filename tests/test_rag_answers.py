"""RAG answers that a small local model gets right: hybrid retrieval (BM25 + vectors),
``--where`` filters on metadata, the prompt, ``rag_prompts`` and a tuned reader, on the
invented handbook of tests/handbook.py with the real embedded models."""

from __future__ import annotations

import pandas as pd
import pytest

import nbcustom
from nbcustom.engines.rag import answers as rag_answers, search as rag_search
from nbcustom.errors import NbCustomError
from nbcustom.store import Store

from conftest import snapshot
from handbook import QUESTIONS, documents_frame, questions_frame

# Its answer is a form code that only document 2 holds; the embedding blurs the code with the
# other QF- forms, BM25 matches its digits.
CODE_QUESTION = "What is form QF-7781 for?"


def ranked_ids(index, question, search, k=4, where=None) -> list:
    return [s["id"] for s in index.retrieve([question], k, search, where)[0]]


def test_hybrid_puts_the_only_document_with_a_code_first_where_vector_does_not(handbook):
    index = nbcustom.load("hb", store=handbook)
    assert sum(1 for _, _, text in documents_frame().itertuples(index=False) if "QF-7781" in text) == 1
    by_meaning = ranked_ids(index, CODE_QUESTION, "vector", k=10)
    assert by_meaning[0] != 2  # the embedding alone puts another form first
    assert ranked_ids(index, CODE_QUESTION, "hybrid")[0] == 2
    assert ranked_ids(index, CODE_QUESTION, "keyword")[0] == 2
    assert index.search == "hybrid"  # the default
    # a hybrid source shows the fused score that ranked it, with its cosine and BM25 beside it
    hybrid = index.retrieve([CODE_QUESTION], 4, "hybrid")[0]
    fused = [s["score"] for s in hybrid]
    assert fused == sorted(fused, reverse=True) and all(0 < f <= 2 / (rag_search.RRF_K + 1) for f in fused)
    by_rank = {s["id"]: n for n, s in enumerate(index.retrieve([CODE_QUESTION], 32, "vector")[0], 1)}
    cosine = {s["id"]: s["score"] for s in index.retrieve([CODE_QUESTION], 32, "vector")[0]}
    bm25 = {s["id"]: s["score"] for s in index.retrieve([CODE_QUESTION], 32, "keyword")[0]}
    assert all(s["vector_score"] == cosine[s["id"]] and s["keyword_score"] == bm25.get(s["id"], s["keyword_score"]) for s in hybrid)
    first = hybrid[0]  # document 2: BM25's first, far down the embedding's ranking
    assert first["keyword_score"] == max(bm25.values()) and by_rank[2] > 1
    assert first["score"] == pytest.approx(1 / (rag_search.RRF_K + 1) + 1 / (rag_search.RRF_K + by_rank[2]), abs=1e-4)



def test_keyword_ranking_keeps_the_k_best_in_order_and_breaks_ties_by_position():
    """The partial sort (a long question matches most chunks) returns what a full stable sort would."""
    import numpy as np

    scores = np.array([0, 3, 1, 3, 0, 2, 3, 1, 2], dtype=np.float32)
    assert rag_search.keyword_ranking(scores, 2) == [(1, 3.0), (3, 3.0)]
    assert rag_search.keyword_ranking(scores, 4) == [(1, 3.0), (3, 3.0), (6, 3.0), (5, 2.0)]
    assert rag_search.keyword_ranking(scores, 20) == [(1, 3.0), (3, 3.0), (6, 3.0), (5, 2.0), (8, 2.0), (2, 1.0), (7, 1.0)]  # no zero
    assert rag_search.keyword_ranking(scores, 2, among=[8, 0, 6, 5, 2]) == [(6, 3.0), (8, 2.0)]
    assert rag_search.keyword_ranking(scores, 1, among=[8, 5]) == [(8, 2.0)]  # ties: the order of ``among``
    rng = np.random.default_rng(0)
    many = rng.integers(0, 6, 5000).astype(np.float32)
    full = np.flatnonzero(many > 0)
    full = full[np.argsort(-many[full], kind="stable")][:50]
    assert [p for p, _ in rag_search.keyword_ranking(many, 50)] == full.tolist()

def test_retrieve_ranks_chunks_and_generates_nothing(ip, handbook, monkeypatch):
    """``nbcustom.retrieve`` and ``%%rag NAME --retrieve``: one row per question and rank, the
    same sources ``ask`` would give the model, and no model loaded."""
    from nbcustom.engines.rag import index as rag_index

    monkeypatch.setattr(rag_index.RagIndex, "llm", lambda *a, **k: pytest.fail("retrieve loaded the answering model"))
    questions = [CODE_QUESTION, QUESTIONS[0][0]]
    frame = nbcustom.retrieve("hb", questions, top_k=3, store=handbook)
    assert list(frame.columns) == ["question", "rank", "id", "score", "vector_score", "keyword_score", "snippet", "metadata"]
    assert frame["question"].tolist() == [questions[0]] * 3 + [questions[1]] * 3 and frame["rank"].tolist() == [1, 2, 3] * 2
    expected = nbcustom.load("hb", store=handbook).retrieve(questions, 3)
    assert frame["id"].tolist() == [s["id"] for found in expected for s in found]
    assert frame["id"].iloc[0] == 2 and "section" in frame["metadata"].iloc[0]
    vector = nbcustom.retrieve("hb", CODE_QUESTION, top_k=2, search="vector", where="section = 'expenses'", store=handbook)
    assert list(vector.columns) == ["question", "rank", "id", "score", "snippet", "metadata"]
    assert all(m["section"] == "expenses" for m in vector["metadata"])
    ip.run_line_magic("config", f"NbCustom.store = {str(handbook)!r}")
    shown = ip.run_cell_magic("rag", "hb --retrieve --top-k 3", f"{CODE_QUESTION}\n\n{QUESTIONS[0][0]}\n")
    assert shown.drop(columns="metadata").equals(frame.drop(columns="metadata"))
    with pytest.raises(NbCustomError, match="one of --ask or --retrieve"):
        ip.run_cell_magic("rag", "hb --retrieve --ask", CODE_QUESTION)
    with pytest.raises(NbCustomError, match="no question given"):
        ip.run_cell_magic("rag", "hb --retrieve", "\n")


def test_hybrid_finds_every_source_vector_finds(handbook):
    index = nbcustom.load("hb", store=handbook)
    questions = [q for q, _, _ in QUESTIONS]
    found = {mode: index.retrieve(questions, 4, mode) for mode in ("vector", "hybrid")}

    def hits(mode):
        return sum(sid in [s["id"] for s in f] for (_, _, sid), f in zip(QUESTIONS, found[mode]))

    assert hits("hybrid") >= hits("vector")


def test_where_restricts_the_sources_of_every_answer_and_works_after_a_refresh(ip, store_dir):
    ip.user_ns["handbook"] = documents_frame()
    ip.run_cell_magic("rag", "hb --metadata section --max-new-tokens 8", "SELECT * FROM handbook")
    questions = ["Who is the chief information officer?", "How much does a replacement badge cost?", "Where are payslips available?"]
    answers = nbcustom.ask("hb", questions, where="section = 'it'", store=store_dir)
    assert all(s["metadata"]["section"] == "it" for found in answers["sources"] for s in found)
    assert answers["sources"][0][0]["id"] == 17
    everywhere = nbcustom.ask("hb", questions[1:2], store=store_dir)
    assert everywhere["sources"][0][0]["metadata"]["section"] == "security"

    # refresh: one IT document changed section, one new IT document; the filter follows
    rows = documents_frame()
    rows.loc[rows["id"] == 17, "section"] = "governance"
    rows = pd.concat([rows, pd.DataFrame([{"id": 40, "section": "it", "text": "Monitors are ordered from the IT shop Screenly."}])])
    ip.user_ns["handbook"] = rows
    ip.run_cell_magic("rag", "hb --metadata section --max-new-tokens 8", "SELECT * FROM handbook")
    assert Store(store_dir).get("hb").manifest["counts"]["embedded"] == 2
    result = ip.run_cell_magic(
        "predict", "hb --where \"section IN ('it', 'governance') AND id <> '15'\" --top-k 3",
        "SELECT 'Who is the chief information officer?' AS question UNION ALL SELECT 'Where are monitors ordered?'",
    )
    sources = [s for found in result["sources"] for s in found]
    assert {s["metadata"]["section"] for s in sources} <= {"it", "governance"} and 15 not in [s["id"] for s in sources]
    assert result["sources"][0][0]["id"] == 17 and result["sources"][1][0]["id"] == 40

    ip.user_ns["questions"] = questions_frame(QUESTIONS[:4])
    ip.run_cell_magic("rag", "hb --eval --where \"section = 'it'\"", "SELECT * FROM questions")
    examples = pd.read_parquet(Store(store_dir).get("hb").path / "eval.parquet")
    it_rows = {str(i) for i, section, _ in rows.itertuples(index=False) if section == "it"}
    assert all(set(r) <= it_rows for r in examples["retrieved"])


def test_where_mistakes_are_one_line_errors_and_leave_the_store_unchanged(ip, store_dir):
    ip.user_ns["handbook"] = documents_frame()
    ip.run_cell_magic("rag", "hb --metadata section --max-new-tokens 8", "SELECT * FROM handbook")
    state = snapshot(store_dir)
    for line, message in [
        ("hb --ask --where \"sektion = 'it'\"", "metadata columns: id, section"),
        ("hb --ask --where \"section = \"", "--where"),
        ("hb --ask --search fuzzy", "--search must be one of"),
        ("hb --ask --llm hb", "--llm hb: that is a rag model"),
    ]:
        with pytest.raises(NbCustomError) as error:
            ip.run_cell_magic("rag", line, "Who is the chief information officer?")
        assert message in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(NbCustomError, match="use it with --ask"):
        ip.run_cell_magic("rag", "hb --where \"section = 'it'\"", "SELECT * FROM handbook")
    assert snapshot(store_dir) == state


def test_the_prompt_has_no_numbered_markers_and_the_best_chunk_last():
    sources = [
        {"text": "best", "score": 0.8}, {"text": "close", "score": 0.7}, {"text": "far", "score": 0.3},
    ]
    system, user = rag_answers.with_context("Q?", sources)
    assert system == rag_answers.SYSTEM_CONTEXT
    assert "[1]" not in user and "far" not in user  # under KEEP x the best score: left out
    assert user.index("close") < user.index("best") < user.index("Question: Q?")


def test_rag_prompts_are_exactly_what_ask_sends(handbook):
    rows = questions_frame(QUESTIONS[:3])
    prompts = nbcustom.rag_prompts("hb", rows, store=handbook)
    assert list(prompts.columns) == ["question", "system", "prompt", "response"]
    assert prompts["response"].tolist() == [a for _, a, _ in QUESTIONS[:3]]
    index = nbcustom.load("hb", store=handbook)
    for question, system, prompt in zip(prompts["question"], prompts["system"], prompts["prompt"]):
        assert (system, prompt) == rag_answers.with_context(question, index.retrieve([question])[0])
    assert "27 days of paid annual leave" in prompts["prompt"][0]


@pytest.mark.slow
def test_a_finetuned_reader_answers_ask_and_eval(ip, store_dir, capsys):
    ip.user_ns["handbook"] = documents_frame()
    ip.run_cell_magic("rag", "hb --metadata section --max-new-tokens 8", "SELECT * FROM handbook")
    ip.user_ns["train_rows"] = nbcustom.rag_prompts("hb", questions_frame(QUESTIONS[:8]), store=store_dir)
    ip.run_cell_magic("finetune", "reader --max-steps 2 --batch-size 4 --eval-frac 0.25 --max-new-tokens 8",
                      "SELECT system, prompt, response FROM train_rows")
    capsys.readouterr()
    ip.run_cell_magic("rag", "hb --ask --llm reader", "Who is the chief information officer?")
    assert "Q: Who is the chief information officer?" in capsys.readouterr().out
    ip.user_ns["questions"] = questions_frame(QUESTIONS[8:10])
    ip.run_cell_magic("rag", "hb --eval --llm reader", "SELECT * FROM questions")
    assert "TunedReader(reader@1)" in capsys.readouterr().out  # the summary names the reader
