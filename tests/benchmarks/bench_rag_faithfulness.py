"""Faithfulness of RAG answers (issue 33). Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_rag_faithfulness.py [--only methods,answers]

methods  How well each way of judging "the retrieved chunks support this sentence" agrees
         with the hand labels of tests/faithfulness_labels.py (132 sentences, two answer
         sets): the lexical measure of ``engines/rag/faithfulness.py`` (and a variant that
         also counts the question's words), the embedding model's cosine similarity with
         the best chunk, and the answering model itself asked "is it supported? yes or no".
         A threshold is chosen on one answer set and scored on the other (both ways), so
         no method is scored on the labels its threshold was chosen on.
answers  On the 48 handbook questions with the index's defaults (hybrid, top 4, 96 new
         tokens): faithfulness and answer_contains of each answer mode: ``generated`` (the
         model's answer as it is: the default before issue 33), ``grounded`` (its supported
         sentences; where none is, the source sentence that best matches the question),
         ``extractive`` (that source sentence alone), and the first sentence of the
         generated answer. Targets: faithfulness >= 0.9 with answer_contains >= 0.750.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faithfulness_labels import LABELS  # noqa: E402
from handbook import DOCUMENTS, QUESTIONS, documents_frame  # noqa: E402

CHUNKS = {i: f"section: {s}\n\n{t}" for i, s, t in DOCUMENTS}  # what the model read
THRESHOLDS = [round(0.05 * n, 2) for n in range(1, 20)]
JUDGE = "Context:\n{context}\n\nStatement: {sentence}\n\nDoes the context support the statement? Answer yes or no."


def lexical(with_question: bool):
    from nbcustom.engines.rag.faithfulness import support

    asked = (lambda q: " " + QUESTIONS[q][0]) if with_question else (lambda q: "")
    return [support(s, [CHUNKS[i] + asked(q) for i in ids]) for q, ids, s, _ in LABELS]


def embedding():
    """The cosine similarity of the sentence with its most similar retrieved chunk."""
    import numpy as np

    from nbcustom.engines.rag.models import embedder

    model = embedder(None)
    texts = sorted(CHUNKS)
    chunk = dict(zip(texts, np.asarray(model.get_text_embedding_batch([CHUNKS[i] for i in texts]))))
    sentence = np.asarray(model.get_text_embedding_batch([s for _, _, s, _ in LABELS]))
    return [max(float(v @ chunk[i]) for i in ids) for v, (_, ids, _, _) in zip(sentence, LABELS)]


def judge():
    """P(yes) of the answering model asked whether the retrieved chunks support the sentence."""
    import torch

    from nbcustom.engines.rag.models import answerer

    llm = answerer(None)
    model, tokenizer = llm._model, llm._tokenizer
    yes, no = (tokenizer.encode(w, add_special_tokens=False)[0] for w in ("yes", "no"))
    out = []
    for _, ids, sentence, _ in LABELS:
        context = "\n\n".join(CHUNKS[i] for i in ids)
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": JUDGE.format(context=context, sentence=sentence)}], tokenize=False, add_generation_prompt=True
        )
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            logits = model(**enc).logits[0, -1]
        out.append(float(torch.softmax(logits[[yes, no]], 0)[0]))
    return out


def agreement(scores, rows) -> float:
    return sum((s >= t) == label for s, (label, t) in zip(scores, rows)) / len(rows)


def cross_set(scores) -> tuple[float, list[float]]:
    """Agreement when the threshold is chosen on one answer set and applied to the other."""
    labels = [label for *_, label in LABELS]
    half = next(n for n in range(1, len(LABELS)) if LABELS[n][0] < LABELS[n - 1][0])  # the second set starts
    sets = [range(0, half), range(half, len(LABELS))]
    chosen, right = [], 0
    for fit, test in (sets, sets[::-1]):
        best = max(THRESHOLDS, key=lambda t: sum((scores[i] >= t) == labels[i] for i in fit))
        chosen.append(best)
        right += sum((scores[i] >= best) == labels[i] for i in test)
    return right / len(LABELS), chosen


def bench_methods() -> None:
    labels = [label for *_, label in LABELS]
    unsupported = labels.count(False)
    print(f"\n== methods: {len(LABELS)} hand-labelled sentences, {unsupported} not supported")
    print(f"{'method':44s} {'agreement':>9s}  {'thresholds':>10s}  {'flags':>5s}  {'caught':>6s}  time")
    for name, run in (
        ("lexical, chunk words (default)", lambda: lexical(False)),
        ("lexical, chunk + question words", lambda: lexical(True)),
        ("embedding cosine (all-MiniLM-L6-v2)", embedding),
        ("LLM judge P(yes) (SmolLM2-135M-Instruct)", judge),
    ):
        started = time.perf_counter()
        scores = run()
        seconds = time.perf_counter() - started
        agree, chosen = cross_set(scores)
        # at the first set's threshold over all labels: how many flagged, how many of the unsupported caught
        flagged = [s < chosen[0] for s in scores]
        caught = sum(f and not label for f, label in zip(flagged, labels))
        print(f"{name:44s} {agree:9.3f}  {'/'.join(map(str, chosen)):>10s}  {sum(flagged):5d}  {caught:3d}/{unsupported}  {seconds:.1f}s", flush=True)
    from nbcustom.engines.rag.faithfulness import SUPPORTED

    scores = lexical(False)
    print(f"the default measure (threshold {SUPPORTED}) on all labels: agreement {agreement(scores, [(l, SUPPORTED) for l in labels]):.3f}")


def bench_answers() -> None:
    import nbcustom
    from nbcustom.engines.rag import answers as rag_answers
    from nbcustom.engines.rag.faithfulness import faithfulness, sentences
    from nbcustom.evaluate import contains, mean

    questions = [q for q, _, _ in QUESTIONS]
    print(f"\n== answers: {len(questions)} handbook questions, the index's defaults")
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        nbcustom.rag("hb", documents_frame(), store=store, ui="none", metadata="section")
        index = nbcustom.load("hb", store=store)
        sources = index.retrieve(questions)
        started = time.perf_counter()
        generated = index.answer(questions, sources, mode="generated")
        seconds = time.perf_counter() - started
        modes = {
            "generated (before issue 33)": generated,
            "first sentence of generated": [(sentences(a) or [""])[0] for a in generated],
            "grounded (default)": [rag_answers.grounded(a, q, s) for a, q, s in zip(generated, questions, sources)],
            "extractive": [rag_answers.extract(q, s) for q, s in zip(questions, sources)],
        }
        print(f"generation: {seconds:.0f}s for {len(questions)} answers")
        for name, answers in modes.items():
            faithful = [faithfulness(a, [s["text"] for s in found]) for a, q, found in zip(answers, questions, sources)]
            figures = {
                "faithfulness": mean(f for f in faithful if f is not None),
                "answer_contains": mean(contains(a, ref) for a, (_, ref, _) in zip(answers, QUESTIONS)),
                "words": mean(len(a.split()) for a in answers),
            }
            print(f"{name:30s} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()), flush=True)
        print("\ngrounded answers (check by eye):")
        for (q, ref, _), a in zip(QUESTIONS, modes["grounded (default)"]):
            print(f"  {q!r} ref {ref!r}: {a!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="methods,answers")
    only = set(parser.parse_args().only.split(","))
    import platform

    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {len(DOCUMENTS)} documents, {len(QUESTIONS)} questions")
    if "methods" in only:
        bench_methods()
    if "answers" in only:
        bench_answers()


if __name__ == "__main__":
    main()
