"""A small task the base model cannot do out of the box: product descriptions -> one line
in a fixed house format ``name | price | colour``."""

from __future__ import annotations

import random

NAMES = ["Aurora", "Birch", "Cobalt", "Dune", "Ember", "Fjord", "Garnet", "Harbor", "Iris", "Juniper",
         "Kestrel", "Lumen", "Maple", "Nimbus", "Onyx", "Pebble", "Quartz", "Raven", "Sable", "Tundra"]
THINGS = ["lamp", "mug", "chair", "backpack", "kettle", "scarf", "clock", "vase", "blanket", "desk"]
COLOURS = ["red", "blue", "green", "black", "white", "yellow", "grey", "orange"]
TEMPLATES = [
    "The {name} {thing} comes in {colour} and sells for {price} dollars.",
    "Meet {name}: a {colour} {thing}, yours for {price} dollars.",
    "For {price} dollars you get the {name} {thing}, finished in {colour}.",
    "{name} is our {colour} {thing}. Price: {price} dollars.",
]
SYSTEM = "Rewrite the product as: name | price | colour"


def rows(n: int, seed: int = 0):
    import pandas as pd

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, thing, colour = rng.choice(NAMES), rng.choice(THINGS), rng.choice(COLOURS)
        price = rng.randint(5, 99)
        prompt = rng.choice(TEMPLATES).format(name=name, thing=thing, colour=colour, price=price)
        out.append({"prompt": prompt, "response": f"{name} | ${price} | {colour}"})
    return pd.DataFrame(out)
