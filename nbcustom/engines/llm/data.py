"""Rows -> chat-formatted token ids, the seeded holdout split and shuffled batches.

A training example and a generation request use the same chat template: the example's
token ids are the generation prompt's ids followed by the response's, so the model learns
on exactly the text it later sees. Labels are -100 on the prompt, so only the response
(and the end-of-turn token that makes generation stop) carries loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...errors import NbCustomError
from .pack import IGNORE

MIN_ROWS = 4


@dataclass
class Example:
    """One tokenized row: ``ids`` = prompt ids + response ids; ``labels`` -100 on the prompt."""

    row: int  # position of the row in the query's result
    prompt: str
    response: str
    system: str | None
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    prompt_length: int = 0

    def __len__(self) -> int:
        return len(self.ids)


def check_rows(rows, prompt: str, response: str | None) -> None:
    """One-line errors for missing columns and NULL or empty values, before any loading;
    with a ``response`` column (training), also for too few rows to hold some out."""
    for option, column in (("prompt", prompt), ("response", response)):
        if column is None:
            continue
        if column not in rows.columns:
            have = ", ".join(map(str, rows.columns))
            raise NbCustomError(f"no column {column!r} in the query's result (columns: {have}); select it or pass --{option} COL")
        empty = int(rows[column].isna().sum() + (rows[column].dropna().astype(str).str.strip() == "").sum())
        if empty:
            raise NbCustomError(f"{empty} row(s) have a NULL or empty {column!r}: filter them out in the query (WHERE {column} <> '')")
    if response is not None:
        _enough(len(rows))


def _enough(n: int) -> None:
    if n < MIN_ROWS:
        raise NbCustomError(f"only {n} row(s): fine-tuning needs at least {MIN_ROWS} so some can be held out for before/after; add rows")


def systems(rows, system: str | None) -> list[str | None]:
    """The system message of each row: the ``system`` column where present, else ``system``."""
    if "system" in rows.columns:
        return [s if isinstance(s, str) and s.strip() else system for s in rows["system"]]
    return [system] * len(rows)


def messages(prompt: str, system: str | None) -> list[dict]:
    chat = [{"role": "system", "content": system}] if system else []
    return chat + [{"role": "user", "content": str(prompt)}]


def prompt_ids(tokenizer, prompt: str, system: str | None) -> list[int]:
    """The generation input: the chat template with the assistant turn opened."""
    text = tokenizer.apply_chat_template(messages(prompt, system), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode(tokenizer, example: Example) -> Example:
    """Fill ``ids`` and ``labels``: the generation prompt's ids, then the response turn's."""
    chat = messages(example.prompt, example.system)
    prompt_text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": str(example.response)}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise NbCustomError("this model's chat template renders the prompt differently in training and generation; choose another --base")
    head = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    tail = tokenizer(full_text[len(prompt_text):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    example.ids, example.labels, example.prompt_length = head + tail, [IGNORE] * len(head) + tail, len(head)
    return example


def examples(rows, tokenizer, prompt: str, response: str, system: str | None) -> list[Example]:
    """Every row as a tokenized ``Example``."""
    found = zip(rows[prompt].astype(str), rows[response].astype(str), systems(rows, system))
    return [encode(tokenizer, Example(i, p, r, s)) for i, (p, r, s) in enumerate(found)]


def split(n: int, eval_frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, holdout) row positions, fixed by ``seed``."""
    import numpy as np

    _enough(n)
    order = np.random.default_rng(seed).permutation(n).tolist()
    held = min(max(1, round(eval_frac * n)), n - 1)
    return sorted(order[held:]), sorted(order[:held])


def batches(count: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches (indices of the training examples), shuffled by ``seed``;
    packing (``llm_pack``) makes a batch's length spread cost no padding."""
    import numpy as np

    order = np.random.default_rng([seed, epoch]).permutation(count).tolist()
    return [order[i:i + batch_size] for i in range(0, count, batch_size)]


def schedule(count: int, batch_size: int, epochs: float, max_steps: int | None, seed: int) -> list[list[int]]:
    """Every step's batch for the whole run: ``max_steps`` if given, else ``epochs`` epochs.
    A resumed run replays the same schedule from its checkpoint step."""
    per_epoch = math.ceil(count / batch_size)
    total = max_steps or max(1, math.ceil(epochs * per_epoch))
    steps, epoch = [], 0
    while len(steps) < total:
        steps += batches(count, batch_size, seed, epoch)
        epoch += 1
    return steps[:total]


def left_padded(sequences: list[list[int]], pad_id: int, device):
    """Generation batch: prompts padded on the left, so every row ends where generation starts."""
    import torch

    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, width - len(s):] = torch.tensor(s)
        mask[row, width - len(s):] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
