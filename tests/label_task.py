"""A label task learnable from keywords: short support tickets routed to one of five teams
whose names say nothing about what they handle, so the base model can only guess."""

from __future__ import annotations

import random

KEYWORDS = {
    "atlas": ["invoice", "refund"],
    "boreal": ["parcel", "courier"],
    "cedar": ["password", "login"],
    "delta": ["crash", "bug"],
    "ember": ["feature", "idea"],
}
LABELS = sorted(KEYWORDS)
TEMPLATES = [
    "Hi, my {word} is a problem {when}.",
    "Question about the {word} {when}, please help.",
    "{When} I noticed the {word} again.",
    "Please look at my {word}, thanks.",
    "There is something with the {word} {when}.",
    "Can someone check the {word}?",
]
WHEN = ["today", "since Monday", "this week", "again", "after the update", "last night"]
SYSTEM = "Route the ticket."


def rows(n: int, seed: int = 0):
    import pandas as pd

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = LABELS[i % len(LABELS)]
        when = rng.choice(WHEN)
        text = rng.choice(TEMPLATES).format(word=rng.choice(KEYWORDS[label]), when=when, When=when.capitalize())
        out.append({"prompt": text, "response": label})
    return pd.DataFrame(out).sample(frac=1, random_state=seed).reset_index(drop=True)
