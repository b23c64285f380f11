"""Label tasks: choosing between labels and free text, constrained prediction and label metrics.

A label model never generates: every label's log-likelihood as the answer to the prompt is
scored and the best one wins, so an answer outside the label set cannot happen. A label is
scored as the exact tokens it was trained on (the response turn: the label and the
end-of-turn token), so "pos" never wins by being a prefix of "positive". Scoring is batched:
one forward pass over the prompts fills the KV cache, which is repeated for every label, and
one more pass over the labels' tokens reads their log-probabilities.
"""

from __future__ import annotations

from ...errors import NbCustomError
from . import data as llm_data

MAX_LABELS = 50
MAX_LABEL_TOKENS = 8
# prompt rows x labels per scoring pass: bounds the repeated KV cache and the labels' logits
SCORE_ROWS = 128


def choose(task: str, responses: list[str], train_at: list[int], held_at: list[int], tokenizer, column: str, previous: list[str] | None = None) -> tuple[list[str] | None, str]:
    """(the label set, or None for free text; why). ``--task labels`` on values that are no
    labels is a one-line error; ``auto`` picks labels when the column has at most
    ``MAX_LABELS`` distinct values of at most ``MAX_LABEL_TOKENS`` tokens and every holdout
    label occurs in training. A continued label model keeps its labels' order and adds new ones."""
    if task == "text":
        return None, "text (--task text)"
    distinct = sorted(set(responses))
    problems = []
    if len(distinct) > MAX_LABELS:
        problems.append(f"{len(distinct):,} distinct values (at most {MAX_LABELS})")
    longest = max(len(ids) for ids in tokenizer(distinct[:1000], add_special_tokens=False)["input_ids"])
    if longest > MAX_LABEL_TOKENS:
        problems.append(f"values of up to {longest} tokens (at most {MAX_LABEL_TOKENS})")
    if len(distinct) < 2:
        problems.append("a single value")
    if task == "labels" and problems:
        raise NbCustomError(f"--task labels: {column!r} has {' and '.join(problems)}, so it holds no labels; use --task text")
    labels = list(previous or []) + [v for v in distinct if v not in (previous or [])]
    kept = f"; the {len(previous)} labels of the previous version kept" if previous else ""
    if task == "labels":
        return labels, f"labels (--task labels): {len(labels)} labels{kept}"
    unseen = sorted({responses[i] for i in held_at} - {responses[i] for i in train_at})
    if unseen:
        problems.append(f"holdout value {unseen[0]!r} never occurs in training")
    if problems:
        return None, f"text (auto): {column!r} has {' and '.join(problems)}"
    return labels, (
        f"labels (auto): {column!r} has {len(distinct)} distinct values of at most {longest} tokens "
        f"and every holdout label occurs in training{kept}"
    )


def label_tokens(tokenizer, labels: list[str]) -> list[list[int]]:
    """Each label's response-turn token ids, exactly as training tokenizes a response."""
    return [(e := llm_data.encode(tokenizer, llm_data.Example(0, "", label, None))).ids[e.prompt_length:] for label in labels]


def log_likelihoods(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """(prompts x answers) array of each answer's summed token log-probability after each
    tokenized prompt: one cached pass over the prompts, one over the answers."""
    import numpy as np
    import torch

    device = next(model.parameters()).device
    count, width = len(answers), max(map(len, answers))
    answer_ids = torch.full((count, width), pad_id, dtype=torch.long)
    answer_mask = torch.zeros((count, width), dtype=torch.long)
    for i, ids in enumerate(answers):
        answer_ids[i, : len(ids)], answer_mask[i, : len(ids)] = torch.tensor(ids), 1
    answer_ids, answer_mask = answer_ids.to(device), answer_mask.to(device)
    scores = np.zeros((len(prompts), count))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    per_pass = max(1, SCORE_ROWS // count)
    model.eval()
    for start in range(0, len(order), per_pass):
        chunk = order[start:start + per_pass]
        batch = llm_data.left_padded([prompts[i] for i in chunk], pad_id, device)
        # left padding: positions count real tokens only, as in an unpadded prompt
        positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            head = model(**batch, position_ids=positions, use_cache=True)
            cache = head.past_key_values
            cache.batch_repeat_interleave(count)
            tail = model(
                input_ids=answer_ids.repeat(len(chunk), 1),
                attention_mask=torch.cat([batch["attention_mask"].repeat_interleave(count, 0), answer_mask.repeat(len(chunk), 1)], 1),
                position_ids=positions[:, -1:].repeat_interleave(count, 0) + 1 + torch.arange(width, device=device),
                past_key_values=cache, use_cache=False,
            )
            # the prompt's last position predicts each answer's first token, the answer's own
            # positions the rest
            logits = torch.cat([head.logits[:, -1:].repeat_interleave(count, 0), tail.logits[:, :-1]], 1)
            picked = torch.log_softmax(logits.float(), -1).gather(2, answer_ids.repeat(len(chunk), 1).unsqueeze(2)).squeeze(2)
            total = (picked * answer_mask.repeat(len(chunk), 1)).sum(1).view(len(chunk), count)
        scores[chunk] = total.cpu().numpy()
    return scores


def classify(model, tokenizer, prompts: list[list[int]], labels: list[str]) -> tuple[list[str], list[float]]:
    """The best label of each tokenized prompt and its confidence (softmax over the labels' scores)."""
    import numpy as np

    scores = log_likelihoods(model, prompts, label_tokens(tokenizer, labels), tokenizer.pad_token_id)
    probabilities = np.exp(scores - scores.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    best = scores.argmax(1)
    return [labels[i] for i in best], probabilities[np.arange(len(best)), best].tolist()


def metrics(predictions: list[str], references: list[str], labels: list[str]) -> tuple[dict, dict]:
    """(accuracy and macro-F1; per-class precision/recall/F1/support and the confusion
    matrix, rows = reference, columns = prediction, in ``labels`` order), from scikit-learn."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(references, predictions, labels=labels, zero_division=0)
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    scores = {"accuracy": float(accuracy_score(references, predictions)), "macro_f1": float(f1_score(references, predictions, average="macro", zero_division=0))}
    return scores, {"per_class": per_class, "confusion": confusion_matrix(references, predictions, labels=labels).tolist()}


def report(labels: list[str], before: list[str], after: list[str], references: list[str], before_label: str = "before") -> tuple[dict, dict, bytes]:
    """The holdout's label report: (manifest field ``label_metrics`` with per-class scores and
    confusion matrices before and after, the summary's per-class table, the confusion chart)."""
    import pandas as pd

    from ...display.charts import confusion_chart

    sides = {"before": metrics(before, references, labels)[1], "after": metrics(after, references, labels)[1]}
    rows = [
        {"label": label, "support": sides["after"]["per_class"][label]["support"],
         **{f"{name} {side}": sides[side]["per_class"][label][name] for name in ("precision", "recall", "f1") for side in sides}}
        for label in labels
    ]
    chart = confusion_chart(labels, {before_label: sides["before"]["confusion"], "after": sides["after"]["confusion"]})
    return {"label_metrics": {"labels": labels, **sides}}, {"per class": pd.DataFrame(rows)}, chart
