import math

import pytest

from nbcustom.evaluate import contains, exact_match, generation_scores, ndcg, normalize, perplexity, recall, rouge_l, token_f1


def test_normalize_drops_case_punctuation_articles_and_spaces():
    assert normalize("  The Red-Mug, an  item! ") == "red mug item"
    assert normalize(None) == ""


def test_exact_match_compares_normalized_text():
    assert exact_match("The red mug.", "red mug") == 1.0
    assert exact_match("red mugs", "red mug") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_counts_overlapping_words():
    assert token_f1("red mug", "red mug") == 1.0
    assert token_f1("blue cup", "red mug") == 0.0
    # precision 1/2, recall 1/1 -> 2/3
    assert token_f1("red mug", "mug") == pytest.approx(2 / 3)
    # repeated words count once per occurrence in both
    assert token_f1("mug mug", "mug") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    assert token_f1("x", "") == 0.0


def test_rouge_l_uses_longest_common_subsequence():
    assert rouge_l("a b c d", "a b c d") == 1.0
    # lcs("x y z w", "x z w q") = x z w = 3 -> p = r = 3/4
    assert rouge_l("x y z w", "x z w q") == pytest.approx(0.75)
    # order matters, unlike token_f1
    assert rouge_l("w z y x", "x y z w") == pytest.approx(0.25)
    assert token_f1("w z y x", "x y z w") == 1.0
    assert rouge_l("", "x") == 0.0


def test_rouge_l_counts_articles_and_repeats_as_the_reference_does():
    # SQuAD normalization would drop the articles and score both 1.0
    assert rouge_l("The cat sat on the mat.", "A cat sat on a mat") == pytest.approx(2 / 3)
    assert rouge_l("the the the", "the") == pytest.approx(0.5)
    assert exact_match("The cat sat on the mat.", "cat sat on mat") == 1.0  # SQuAD normalization kept


def _varied_pairs(n: int) -> list[tuple[str, str]]:
    """Predictions and references with case, punctuation, articles, repeats, numbers,
    reordering, dropped and extra words, and empty texts."""
    import random

    words = "the a an cat dog sat on mat red blue mug 12 dollars Onyx | $ price, colour! it's x-ray e.g. naïve".split()
    rng = random.Random(13)
    pairs = [("", ""), ("", "red mug"), ("red mug", ""), ("...", "!!!")]
    while len(pairs) < n:
        ref = [rng.choice(words) for _ in range(rng.randint(1, 14))]
        pred = list(ref)
        for _ in range(rng.randint(0, 5)):
            edit = rng.random()
            if edit < 0.3 and pred:
                pred.pop(rng.randrange(len(pred)))
            elif edit < 0.6:
                pred.insert(rng.randint(0, len(pred)), rng.choice(words))
            elif pred:
                i, j = rng.randrange(len(pred)), rng.randrange(len(pred))
                pred[i], pred[j] = pred[j], pred[i]
        upper = rng.random() < 0.3
        pairs.append((" ".join(pred).upper() if upper else " ".join(pred), " ".join(ref)))
    return pairs


def test_rouge_l_equals_rouge_score_on_varied_pairs():
    from rouge_score import rouge_scorer

    reference = rouge_scorer.RougeScorer(["rougeL"])
    pairs = _varied_pairs(80)
    scores = [rouge_l(p, r) for p, r in pairs]
    assert len(set(scores)) > 20  # varied: not all 0 or 1
    for (pred, ref), ours in zip(pairs, scores):
        assert abs(ours - reference.score(ref, pred)["rougeL"].fmeasure) <= 1e-9, (pred, ref)


def test_contains_matches_whole_words():
    assert contains("It costs 12 dollars.", "12 dollars") == 1.0
    assert contains("It costs 125 dollars.", "12 dollars") == 0.0
    assert contains("anything", "") == 0.0


def test_generation_scores_are_means():
    scores = generation_scores(["red mug", "blue cup"], ["red mug", "red mug"])
    assert scores == {"exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
    assert generation_scores([], []) == {"exact_match": 0.0, "token_f1": 0.0, "rouge_l": 0.0}


def test_perplexity_is_exp_of_loss():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.e**2)
    assert math.isfinite(perplexity(1e6))


def test_recall_and_ndcg_of_a_ranking():
    assert recall(["a", "b", "c"], ["b"]) == 1.0
    assert recall(["a", "b"], ["b", "z"]) == 0.5
    assert recall(["a"], []) == 0.0
    assert ndcg(["b", "a"], ["b"]) == 1.0
    # one relevant id at rank 2: 1/log2(3)
    assert ndcg(["a", "b"], ["b"]) == pytest.approx(1 / math.log2(3))
    # both relevant, second one at rank 3: (1 + 1/log2(4)) / (1 + 1/log2(3))
    assert ndcg(["x", "a", "y", "b"][1:], ["a", "b"]) == pytest.approx((1 + 0.5) / (1 + 1 / math.log2(3)))
    assert ndcg(["a"], ["z"]) == 0.0


def test_rouge_l_leaves_the_root_logger_without_handlers():
    """rouge-score's default tokenizer is announced through absl, whose first log call runs
    ``logging.basicConfig()``: in a kernel every library's debug lines (bm25s) then reach the
    cell's stderr. A fresh process, because pytest gives the root logger handlers."""
    import subprocess
    import sys

    code = "import logging; from nbcustom.evaluate import rouge_l; rouge_l('a b', 'a c'); print(len(logging.root.handlers))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0", out.stderr
