"""Faithfulness of RAG answers: the measure (engines/rag/faithfulness.py) against hand labels
and on answers with invented sentences, grounded and extractive answers, and the sources
table of hybrid search in rank order with the fused score."""

from __future__ import annotations

import pytest

import nbcustom
from nbcustom.display.answers import answers_html, answers_text
from nbcustom.display.render import fmt
from nbcustom.engines.rag import answers as rag_answers
from nbcustom.engines.rag.faithfulness import SUPPORTED, check, faithfulness, sentences, support
from nbcustom.evaluate import contains, mean

from faithfulness_labels import LABELS
from handbook import DOCUMENTS, QUESTIONS

# The example: the number is right, the rest is in no source.
CLUB = "Trailhead Club: staff may join the Trailhead Club, the company's hiking club. The membership costs 299 NOK per year."
CLUB_ANSWER = (
    "The answer is: 299. The Trailhead Club is a subscription-based business that offers a monthly membership with "
    "exclusive perks. The price of the Trailhead Club membership is 299 NOK per year, which is a significant discount "
    "compared to other subscription-based services."
)


def test_an_invented_sentence_is_flagged_and_a_copied_one_passes():
    checked = check(CLUB_ANSWER, [CLUB, "Parking: the garage has 40 places."])
    assert [ok for _, ok in checked] == [True, False, False]
    assert faithfulness(CLUB_ANSWER, [CLUB]) == pytest.approx(1 / 3)
    assert faithfulness("The membership costs 299 NOK per year.", [CLUB]) == 1.0  # copied from the source
    # a wrong number is not supported, however many words match
    assert faithfulness("The membership costs 199 NOK per year.", [CLUB]) == 0.0
    # support comes from one chunk: words of two chunks do not make a claim
    assert support("The Trailhead Club members park in the garage.", [CLUB, "Parking: staff park in the garage."]) < SUPPORTED
    assert faithfulness("", [CLUB]) is None


def test_sentences_split_at_stops_and_line_breaks_without_list_numbers():
    assert sentences("1.\n\nLunch costs 4.50 euros. It opens at 11:30!\n2.\nA: 1.") == ["Lunch costs 4.50 euros.", "It opens at 11:30!", "A: 1."]
    assert faithfulness("Lunch costs 4.5 euros.", ["A lunch costs 4.50 euros."]) == 1.0  # 4.50 = 4.5
    assert faithfulness("The limit is 2500 euros.", ["The monthly card limit is 2,500 euros."]) == 1.0


def test_the_measure_agrees_with_the_hand_labels():
    chunks = {i: f"section: {s}\n\n{t}" for i, s, t in DOCUMENTS}
    agree = mean((support(s, [chunks[i] for i in ids]) >= SUPPORTED) == label for _, ids, s, label in LABELS)
    assert len(LABELS) >= 60 and 0 < sum(label for *_, label in LABELS) < len(LABELS)
    assert agree >= 0.85  # 0.871 at the default threshold (tests/benchmarks/RESULTS.md)


def test_grounded_keeps_supported_sentences_else_copies_the_best_matching_source_sentence():
    sources = [{"text": f"section: social\n\n{CLUB}", "metadata": {"section": "social"}, "score": 0.7}]
    assert rag_answers.grounded(CLUB_ANSWER, "How much is the Trailhead Club membership?", sources) == "The answer is: 299."
    invented = "The club is a luxury service."
    assert rag_answers.grounded(invented, "How much does the membership cost?", sources) == "The membership costs 299 NOK per year."
    assert rag_answers.extract("Which club can staff join?", sources).startswith("Trailhead Club: staff may join")
    assert rag_answers.extract("Anything?", []) == ""


@pytest.fixture
def index(handbook):
    return nbcustom.load("hb", store=handbook)


# Questions where the generated answer of the default model invents (a luxury travel agency,
# the badge's British symbolism, the CIO's job) or answers wrongly, and four it gets right.
SAMPLE = [QUESTIONS[n] for n in (13, 17, 22, 29, 46, 0, 7, 25)]


@pytest.mark.slow
def test_grounded_answers_say_only_what_the_sources_say_and_keep_the_right_answers(index):
    questions = [q for q, _, _ in SAMPLE]
    generated = index.ask(questions, max_new_tokens=48, answers="generated")
    grounded = index.ask(questions, max_new_tokens=48)  # the default
    assert index.answers == "grounded"

    def scores(frame):
        return frame["faithfulness"].mean(), mean(contains(a, ref) for a, (_, ref, _) in zip(frame["answer"], SAMPLE))

    (faithful_before, right_before), (faithful_after, right_after) = scores(generated), scores(grounded)
    assert faithful_before < 0.8 and faithful_after >= 0.9
    assert right_after >= right_before
    # the grounded answers are the generated ones' supported sentences, or a source sentence
    for question, said, was, found in zip(questions, grounded["answer"], generated["answer"], index.retrieve(questions)):
        kept = [s for s, ok in check(was, [s["text"] for s in found]) if ok]
        assert said == (" ".join(kept) if kept else rag_answers.extract(question, found))
    assert "luxury" not in grounded["answer"][0] and "Norvia Travel" in grounded["answer"][0]
    extractive = index.ask(questions, answers="extractive")
    assert (extractive["faithfulness"] == 1.0).all()


def test_the_hybrid_sources_table_is_in_rank_order_with_the_fused_score(index):
    frame = index.ask(["Which form is used to request parental leave?"], answers="extractive")
    sources = frame["sources"][0]
    assert frame.attrs["search"] == "hybrid" and [s["id"] for s in sources][0] == 2
    assert [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)
    html, text = answers_html(frame), answers_text(frame)
    assert "<th>score</th><th>vector</th><th>keyword</th>" in html
    rows = [html.index(f"<td>{n}</td><td>{s['id']}</td><td>{fmt(s['score'])}</td>") for n, s in enumerate(sources, 1)]
    assert rows == sorted(rows)
    first = sources[0]
    assert f"[1] 2 ({fmt(first['score'])}; vector {fmt(first['vector_score'])}; keyword {fmt(first['keyword_score'])})" in text
    assert "faithfulness 1.00" in text
