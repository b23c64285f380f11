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


def tiny_base(folder):
    """A two-layer model with SmolLM2's architecture and tokenizer, saved in ``folder`` as a
    local base (``--base FOLDER``): the paths of the real model at a fraction of its cost."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from nbcustom import models

    smollm2, folder = models.resolve_llm(None), Path(folder)
    config = AutoConfig.from_pretrained(smollm2)
    config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(folder)
    return folder
