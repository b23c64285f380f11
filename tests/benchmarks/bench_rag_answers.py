"""RAG answer quality on the invented handbook (tests/handbook.py: 32 documents, 48
questions with numbers, form codes and names) with the embedded models (all-MiniLM-L6-v2,
SmolLM2-135M-Instruct). Not collected by pytest; run it by hand:

    .venv/bin/python tests/benchmarks/bench_rag_answers.py [--only retrieval,old,answers,reader] [--no-eval]
        [--questions 48] [--max-new-tokens 24] [--reader-steps 24] [--answer-modes vector,keyword]

retrieval  hit_rate@4, mrr, recall@4, ndcg@4 for vector, keyword and hybrid ranking.
old,       answer_contains / answer_f1 / hit_rate@4 of the previous prompt (chunks numbered
answers    ``[1] ... [4]``, best first, vector ranking: the code before issue 18, kept here)
           against the new prompt with each ranking; the default (hybrid) goes through
           ``nbcustom.rag_eval``, the ``%%rag --eval`` path.
           Targets (issue 18): default answer_contains >= 0.6 and >= old + 0.15;
           hybrid hit_rate@4 >= vector's.
reader     ``rag_prompts`` of the even-numbered questions -> ``nbcustom.finetune`` a reader;
           on the odd-numbered questions (same retrieval), the base model's answer_contains
           against the reader's. Target: the reader's is higher.
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

from handbook import QUESTIONS, documents_frame, questions_frame  # noqa: E402

MODES = ("vector", "keyword", "hybrid")
K = 4


def old_prompt(question: str, sources: list[dict]) -> tuple[str, str]:
    """The prompt before issue 18: every retrieved chunk, numbered, best first."""
    from nbcustom.engines.rag.answers import SYSTEM_CONTEXT

    context = "\n".join(f"[{n}] {s['text']}" for n, s in enumerate(sources, 1))
    return SYSTEM_CONTEXT, f"Context:\n{context}\n\nQuestion: {question}"


def retrieval_scores(sources, rows) -> dict:
    from nbcustom.evaluate import mean, ndcg, recall

    ranked = [list(dict.fromkeys(str(s["id"]) for s in found)) for found in sources]
    relevant = [[str(sid)] for _, _, sid in rows]
    return {
        f"hit_rate@{K}": mean(1.0 if rel[0] in r else 0.0 for r, rel in zip(ranked, relevant)),
        "mrr": mean(1.0 / (r.index(rel[0]) + 1) if rel[0] in r else 0.0 for r, rel in zip(ranked, relevant)),
        f"recall@{K}": mean(recall(r, rel) for r, rel in zip(ranked, relevant)),
        f"ndcg@{K}": mean(ndcg(r, rel) for r, rel in zip(ranked, relevant)),
    }


def answer_scores(answers, rows) -> dict:
    from nbcustom.evaluate import contains, mean, token_f1

    return {
        "answer_contains": mean(contains(a, ref) for a, (_, ref, _) in zip(answers, rows)),
        "answer_f1": mean(token_f1(a, ref) for a, (_, ref, _) in zip(answers, rows)),
    }


def line(label: str, metrics: dict, seconds: float | None = None) -> None:
    figures = "  ".join(f"{k} {v:.3f}" for k, v in metrics.items())
    print(f"{label:34s} {figures}" + (f"  ({seconds:.0f}s)" if seconds is not None else ""), flush=True)


def bench_retrieval(index, rows) -> None:
    print(f"\n== retrieval: {len(rows)} questions, top {K}")
    for mode in MODES:
        started = time.perf_counter()
        sources = index.retrieve([q for q, _, _ in rows], K, mode)
        line(mode, retrieval_scores(sources, rows), time.perf_counter() - started)


def bench_answers(index, rows, store: Path, max_new_tokens: int, modes, parts, with_eval: bool) -> dict:
    import nbcustom

    questions = [q for q, _, _ in rows]
    print(f"\n== answers: {len(rows)} questions, top {K}, at most {max_new_tokens} new tokens")
    results = {}
    vector = index.retrieve(questions, K, "vector")
    if "old" in parts:
        started = time.perf_counter()
        old = index.reader().generate([old_prompt(q, s) for q, s in zip(questions, vector)], max_new_tokens)
        results["old"] = {**answer_scores(old, rows), f"hit_rate@{K}": retrieval_scores(vector, rows)[f"hit_rate@{K}"]}
        line("old prompt, vector", results["old"], time.perf_counter() - started)
    if "answers" not in parts:
        return results
    for mode in modes:
        sources = vector if mode == "vector" else index.retrieve(questions, K, mode)
        started = time.perf_counter()
        answers = index.answer(questions, sources, max_new_tokens)
        results[mode] = {**answer_scores(answers, rows), f"hit_rate@{K}": retrieval_scores(sources, rows)[f"hit_rate@{K}"]}
        line(f"new prompt, {mode}", results[mode], time.perf_counter() - started)
    started = time.perf_counter()
    if with_eval:
        version = nbcustom.rag_eval("hb", questions_frame(rows), store=store, ui="none")
        after, before = version.manifest["metrics"]["after"], version.manifest["metrics"]["before"]
        line("new prompt, hybrid (default, --eval)", after, time.perf_counter() - started)
        line("  the LLM alone (--eval before)", before)
    else:  # the --eval after side: the same retrieve + answer with the index's defaults
        sources = index.retrieve(questions)
        after = {**answer_scores(index.answer(questions, sources, max_new_tokens), rows), **retrieval_scores(sources, rows)}
        line("new prompt, hybrid (default)", after, time.perf_counter() - started)
    results["hybrid"] = after
    if "old" not in results:
        return results
    gain = after["answer_contains"] - results["old"]["answer_contains"]
    print(f"default answer_contains {after['answer_contains']:.3f} (target >= 0.6): {'PASS' if after['answer_contains'] >= 0.6 else 'FAIL'}")
    print(f"gain over the old prompt {gain:+.3f} (target >= +0.15): {'PASS' if gain >= 0.15 else 'FAIL'}")
    vector_hits = results["old"][f"hit_rate@{K}"]  # the old prompt's sources are the vector ranking
    ok = after[f"hit_rate@{K}"] >= vector_hits
    print(f"hybrid hit_rate@{K} {after[f'hit_rate@{K}']:.3f} vs vector {vector_hits:.3f}: {'PASS' if ok else 'FAIL'}")
    return results


def bench_reader(index, store: Path, max_new_tokens: int, steps: int) -> None:
    import nbcustom

    train, test = QUESTIONS[::2], QUESTIONS[1::2]
    print(f"\n== reader: fine-tuned on {len(train)} question/answer pairs, scored on the other {len(test)}")
    prompts = nbcustom.rag_prompts("hb", questions_frame(train), store=store)
    started = time.perf_counter()
    nbcustom.finetune(
        "reader", prompts[["system", "prompt", "response"]], store=store, ui="none",
        max_steps=steps, batch_size=4, lr=1e-3, eval_frac=0.1, max_new_tokens=max_new_tokens,
    )
    print(f"fine-tuning: {steps} steps in {time.perf_counter() - started:.0f}s")
    questions = [q for q, _, _ in test]
    sources = index.retrieve(questions, K)  # the same retrieval for both readers
    base = index.answer(questions, sources, max_new_tokens)
    reader = nbcustom.load("reader", store=store)
    tuned = index.answer(questions, sources, max_new_tokens, llm=reader)
    before, after = answer_scores(base, test), answer_scores(tuned, test)
    line("base model", before)
    line("fine-tuned reader", after)
    ok = after["answer_contains"] > before["answer_contains"]
    print(f"reader answer_contains {after['answer_contains']:.3f} vs base {before['answer_contains']:.3f}: {'PASS' if ok else 'FAIL'}")
    for (q, ref, _), a, b in list(zip(test, base, tuned))[:6]:
        print(f"  {q!r}  ref {ref!r}  base {a!r}  reader {b!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", default="retrieval,old,answers,reader")
    parser.add_argument("--no-eval", action="store_true", help="score the default without rag_eval's LLM-alone side (time)")
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--reader-steps", type=int, default=24)
    parser.add_argument("--answer-modes", default="vector,keyword", help="other rankings to answer with (new prompt); '' for none")
    args = parser.parse_args()
    only = set(args.only.split(","))

    import platform

    import nbcustom

    print(f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {len(documents_frame())} documents, {len(QUESTIONS)} questions")
    rows = QUESTIONS[: args.questions]
    with tempfile.TemporaryDirectory() as scratch:
        store = Path(scratch) / "store"
        nbcustom.rag("hb", documents_frame(), store=store, ui="none", metadata="section", max_new_tokens=args.max_new_tokens)
        index = nbcustom.load("hb", store=store)
        if "retrieval" in only:
            bench_retrieval(index, rows)
        if only & {"old", "answers"}:
            modes = [m for m in args.answer_modes.split(",") if m]
            bench_answers(index, rows, store, args.max_new_tokens, modes, only, not args.no_eval)
        if "reader" in only:
            bench_reader(index, store, args.max_new_tokens, args.reader_steps)


if __name__ == "__main__":
    main()
