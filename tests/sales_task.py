"""Weekly unit sales of stores whose promotions and prices are planned ahead: a promotion
lifts a week's sales by half, a price above the list price lowers them. Without the plan a
forecaster sees promotion weeks as noise; with it (known covariates) it sees them coming."""

from __future__ import annotations

import math
import random

START = "2023-01-02"  # a Monday: weekly timestamps W-MON


def rows(stores: int = 20, weeks: int = 156, seed: int = 0):
    """``store``, ``week``, ``units``, ``promo`` (0/1), ``price``, ``size`` (constant per store)."""
    import pandas as pd

    rng = random.Random(seed)
    out = []
    dates = pd.date_range(START, periods=weeks, freq="W-MON")
    for s in range(stores):
        level, size = rng.uniform(80, 160), rng.choice(["small", "large"])
        level *= 1.5 if size == "large" else 1.0
        for w, week in enumerate(dates):
            promo = int(rng.random() < 0.2)
            price = round(rng.choice([9.99, 9.99, 10.99, 11.99]) * (0.9 if promo else 1.0), 2)
            season = 1 + 0.15 * math.sin(2 * math.pi * w / 52)
            units = level * season * (1.5 if promo else 1.0) * (1 - 0.2 * (price - 9.99) / 2) * rng.gauss(1, 0.04)
            out.append({"store": f"s{s:02d}", "week": week, "units": round(units, 1), "promo": promo, "price": price, "size": size})
    return pd.DataFrame(out)


def plan(history, weeks: int, seed: int = 1):
    """The next ``weeks`` weeks after ``history`` for every store: promo and price planned,
    no units (what %%predict is handed)."""
    import pandas as pd

    rng = random.Random(seed)
    last = history["week"].max()
    out = []
    for store in sorted(history["store"].unique()):
        for week in pd.date_range(last, periods=weeks + 1, freq="W-MON")[1:]:
            promo = int(rng.random() < 0.2)
            out.append({"store": store, "week": week, "promo": promo, "price": 8.99 if promo else 9.99})
    return pd.DataFrame(out)
