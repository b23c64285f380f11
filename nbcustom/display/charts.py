"""Matplotlib charts rendered straight to PNG bytes (no pyplot, no GUI backend)."""

from __future__ import annotations

import io
import textwrap
from typing import Mapping, Sequence


def _figure(width=6.0, height=3.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="tight")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def loss_chart(steps: Sequence[float], losses: Sequence[float], eval_steps: Sequence[float] = (), eval_losses: Sequence[float] = ()) -> bytes:
    """Training loss per step, with eval loss points."""
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, losses, label="train loss", linewidth=1.2)
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return _png(fig)


def before_after_figure(before: Mapping[str, float], after: Mapping[str, float], title: str = "before / after", before_label="before", after_label="after"):
    """Small multiples: one panel per metric both sides share, each on its own scale (a
    perplexity of 21 beside an exact match of 0.4 would flatten one of them), lower-is-better
    metrics marked in their panel's title."""
    from .render import fmt, lower_is_better

    names = [k for k in after if _number(after.get(k)) and _number(before.get(k))]
    columns = min(len(names), 3) or 1
    rows = -(-len(names) // columns) or 1
    fig = _figure(max(3.0, 2.3 * columns), 0.5 + 2.3 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, columns, i + 1)
        values = [before[name], after[name]]
        bars = ax.bar([0, 1], values, width=0.6, color=["#9aa4ad", "#2f81f7"])
        ax.bar_label(bars, [fmt(v) for v in values], fontsize=8, padding=2)
        ax.set_xticks([0, 1], [textwrap.fill(before_label, 12), textwrap.fill(after_label, 12)], fontsize=8)
        ax.set_title(f"{name}\n(lower is better)" if lower_is_better(name) else name, fontsize=9)
        ax.margins(y=0.2)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig


def before_after_chart(before: Mapping[str, float], after: Mapping[str, float], title: str = "before / after", before_label="before", after_label="after") -> bytes:
    """``before_after_figure`` as PNG bytes."""
    return _png(before_after_figure(before, after, title, before_label, after_label))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def bar_chart(values: Mapping[str, float], title: str, xlabel: str = "", ordered: bool = False) -> bytes:
    """Horizontal bars, largest on top (feature importance, leaderboard scores); ``ordered``:
    in the given order instead, the first on top."""
    items = list(values.items())[:15][::-1] if ordered else sorted(values.items(), key=lambda kv: kv[1])[-15:]
    fig = _figure(6, max(2.0, 0.3 * len(items) + 1))
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color="#2f81f7")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def forecast_chart(history_x, history_y, actual_x, actual_y, series: Mapping[str, tuple], title: str = "forecast vs actual", band=None,
                   marks=None) -> bytes:
    """History, actual holdout values and one or more forecasts (label -> (x, y)); ``band``:
    (x, low, high) shaded; ``marks``: (x values, label) of steps shaded as set."""
    fig = _figure(7, 3.4)
    ax = fig.add_subplot()
    if marks is not None:
        xs, label = marks
        for n, x in enumerate(xs):
            ax.axvline(x, color="#d29922", alpha=0.3, linewidth=5, label=f"{label} set" if n == 0 else None)
    ax.plot(history_x, history_y, color="#57606a", linewidth=1, label="history")
    ax.plot(actual_x, actual_y, color="black", linewidth=1.5, label="actual")
    for (label, (x, y)), colour in zip(series.items(), ["#9aa4ad", "#2f81f7", "#bf3989"]):
        ax.plot(x, y, "--", color=colour, linewidth=1.5, label=label)
    if band is not None:
        x, low, high = band
        ax.fill_between(x, low, high, color="#2f81f7", alpha=0.15, label="p10-p90")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.autofmt_xdate()
    return _png(fig)


def confusion_chart(labels: Sequence[str], matrices: Mapping[str, Sequence[Sequence[int]]]) -> bytes:
    """Confusion matrices side by side (title -> rows = reference, columns = prediction), counts in the cells."""
    size = max(2.4, 0.45 * len(labels) + 1.2)
    fig = _figure(size * len(matrices) + 0.5, size + 0.6)
    for i, (title, matrix) in enumerate(matrices.items(), 1):
        ax = fig.add_subplot(1, len(matrices), i)
        ax.imshow(matrix, cmap="Blues")
        peak = max(max(row) for row in matrix) or 1
        for r, row in enumerate(matrix):
            for c, count in enumerate(row):
                if count:
                    ax.text(c, r, str(count), ha="center", va="center", fontsize=8, color="white" if count > peak / 2 else "black")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(labels)), labels if i == 1 else [], fontsize=8)
        ax.set_xlabel("prediction")
        if i == 1:
            ax.set_ylabel("reference")
        ax.set_title(title)
    return _png(fig)
