"""Pure functions from run data to HTML and text: easy to test, no IPython needed."""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

# Metrics where smaller is better; every other metric is better when larger.
LOWER_IS_BETTER = ("loss", "perplexity", "rmse", "mse", "mae", "mape", "wql", "mase", "error", "seconds")


@dataclass
class Summary:
    """Everything the end of a run shows."""

    title: str
    before: Mapping[str, Any] = field(default_factory=dict)
    after: Mapping[str, Any] = field(default_factory=dict)
    before_label: str = "before"
    after_label: str = "after"
    facts: Mapping[str, Any] = field(default_factory=dict)
    tables: Mapping[str, Any] = field(default_factory=dict)  # name -> DataFrame
    charts: Mapping[str, bytes] = field(default_factory=dict)  # name -> PNG
    notes: list[str] = field(default_factory=list)


@dataclass
class ProgressState:
    """What the progress line shows."""

    title: str
    phase: str = ""
    step: int = 0
    total: int | None = None
    elapsed: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)

    @property
    def eta(self) -> float | None:
        if not self.total or not self.step:
            return None
        return self.elapsed / self.step * max(self.total - self.step, 0)


def fmt(value: Any) -> str:
    """A number shown with 4 significant digits; anything else as text."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"


def lower_is_better(metric: str) -> bool:
    return any(word in metric.lower() for word in LOWER_IS_BETTER)


def better(metric: str, delta: float) -> bool | None:
    """Whether a change of ``delta`` in ``metric`` is an improvement (None: no change)."""
    if delta == 0 or delta != delta:
        return None
    return (delta < 0) if lower_is_better(metric) else (delta > 0)


def metric_rows(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[tuple[str, Any, Any, float | None]]:
    """(metric, before, after, delta) for every metric either side has, in a stable order."""
    names = list(dict.fromkeys([*before, *after]))
    rows = []
    for name in names:
        b, a = before.get(name), after.get(name)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
        rows.append((name, b, a, (a - b) if numeric else None))
    return rows


def metrics_text(before, after, before_label="before", after_label="after") -> str:
    rows = metric_rows(before, after)
    if not rows:
        return ""
    width = max(len("metric"), *(len(r[0]) for r in rows))
    lines = [f"{'metric':<{width}}  {before_label:>10}  {after_label:>10}  {'delta':>10}"]
    for name, b, a, d in rows:
        delta = "" if d is None else ("+" if d > 0 else "") + fmt(d)
        lines.append(f"{name:<{width}}  {fmt(b):>10}  {fmt(a):>10}  {delta:>10}")
    return "\n".join(lines)


def metrics_html(before, after, before_label="before", after_label="after") -> str:
    rows = metric_rows(before, after)
    if not rows:
        return ""
    out = [
        '<table class="nbc-metrics"><thead><tr><th>metric</th>'
        f"<th>{html.escape(before_label)}</th><th>{html.escape(after_label)}</th><th>delta</th></tr></thead><tbody>"
    ]
    for name, b, a, d in rows:
        if d is None:
            delta = ""
        else:
            good = better(name, d)
            colour = {True: "#1a7f37", False: "#cf222e", None: "inherit"}[good]
            delta = f'<span style="color:{colour}">{"+" if d > 0 else ""}{html.escape(fmt(d))}</span>'
        out.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(fmt(b))}</td>"
            f"<td>{html.escape(fmt(a))}</td><td>{delta}</td></tr>"
        )
    out.append("</tbody></table>")
    return "".join(out)


def facts_text(facts: Mapping[str, Any]) -> str:
    return "  ".join(f"{k}: {fmt(v)}" for k, v in facts.items())


def table_html(frame, max_rows: int = 20, max_chars: int = 300) -> str:
    """A DataFrame as a compact HTML table, long cells shortened."""
    rows = frame.head(max_rows)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows.columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="text-align:left;white-space:pre-wrap">{html.escape(_short(v, max_chars))}</td>' for v in row) + "</tr>"
        for row in rows.itertuples(index=False)
    )
    more = f"<p><i>{len(frame) - max_rows} more rows</i></p>" if len(frame) > max_rows else ""
    return f'<table class="nbc-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}'


def table_text(frame, max_rows: int = 10, max_chars: int = 60) -> str:
    rows = frame.head(max_rows).copy()
    for column in rows.columns:
        rows[column] = rows[column].map(lambda v: _short(v, max_chars))
    return rows.to_string(index=False)


def png_html(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" style="max-width:640px" src="data:image/png;base64,{data}"/>'


def summary_html(summary: Summary) -> str:
    parts = [f'<div class="nbc-summary"><h4>{html.escape(summary.title)}</h4>']
    if summary.facts:
        parts.append("<p>" + " &middot; ".join(f"<b>{html.escape(k)}</b> {html.escape(fmt(v))}" for k, v in summary.facts.items()) + "</p>")
    parts.append(metrics_html(summary.before, summary.after, summary.before_label, summary.after_label))
    for note in summary.notes:
        parts.append(f"<p><i>{html.escape(note)}</i></p>")
    for name, png in summary.charts.items():
        parts.append(png_html(png, name))
    for name, frame in summary.tables.items():
        parts.append(f"<h5>{html.escape(name)}</h5>{table_html(frame)}")
    parts.append("</div>")
    return "".join(parts)


def summary_text(summary: Summary) -> str:
    parts = [summary.title]
    if summary.facts:
        parts.append(facts_text(summary.facts))
    metrics = metrics_text(summary.before, summary.after, summary.before_label, summary.after_label)
    if metrics:
        parts.append(metrics)
    parts.extend(summary.notes)
    for name, frame in summary.tables.items():
        parts.append(f"{name}:\n{table_text(frame)}")
    return "\n".join(parts)


def progress_text(state: ProgressState) -> str:
    parts = [state.title]
    if state.phase:
        parts.append(state.phase)
    if state.total:
        parts.append(f"step {state.step}/{state.total}")
    elif state.step:
        parts.append(f"step {state.step}")
    parts.append(f"elapsed {duration(state.elapsed)}")
    if state.eta is not None:
        parts.append(f"eta {duration(state.eta)}")
    parts.extend(f"{k} {fmt(v)}" for k, v in state.metrics.items())
    return " | ".join(parts)


def progress_html(state: ProgressState) -> str:
    fraction = min(state.step / state.total, 1.0) if state.total else (1.0 if state.phase == "done" else 0.0)
    bar = (
        '<div style="width:300px;height:10px;border:1px solid #999;display:inline-block;vertical-align:middle">'
        f'<div style="width:{fraction * 100:.1f}%;height:100%;background:#2f81f7"></div></div>'
    )
    return f"<div>{bar} <code>{html.escape(progress_text(state))}</code></div>"


def _short(value: Any, limit: int) -> str:
    text = fmt(value) if isinstance(value, float) else ("" if value is None else str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"
