"""Answers with their sources (``%%rag NAME --ask``): pure HTML / text renderers and one
display call that shows both, so a saved notebook stays readable."""

from __future__ import annotations

import html
import math

from .render import fmt


def _sources(row) -> list[dict]:
    sources = row.get("sources")
    return list(sources) if sources is not None else []


# The score that ranked the sources, by --search; keyword and hybrid sources also show both parts.
SCORE = {"vector": "cosine similarity", "keyword": "BM25", "hybrid": "fused score (reciprocal rank fusion)"}
PARTS = (("vector_score", "vector"), ("keyword_score", "keyword"))


def _faithfulness(row) -> str:
    value = row.get("faithfulness")
    return "" if value is None or math.isnan(value) else f"faithfulness {value:.2f} (share of its sentences the sources support)"


def answers_html(frame) -> str:
    """Each question, its answer, its faithfulness and a table of its sources in rank order
    (id, the score that ranked it, its vector and keyword scores where both ranked, snippet)."""
    parts = ['<div class="nbc-answers">']
    for row in frame.to_dict("records"):
        parts.append(
            f'<div style="margin-bottom:1em"><p><b>Q:</b> {html.escape(str(row["question"]))}</p>'
            f'<p><b>A:</b> {html.escape(str(row["answer"]))}</p>'
        )
        if _faithfulness(row):
            parts.append(f'<p style="color:#57606a">{html.escape(_faithfulness(row))}</p>')
        sources = _sources(row)
        if sources:
            shown = [(key, label) for key, label in PARTS if key in sources[0]]
            head = "".join(f"<th>{label}</th>" for _, label in shown)
            parts.append(f'<table class="nbc-table"><thead><tr><th>#</th><th>id</th><th>score</th>{head}<th>snippet</th></tr></thead><tbody>')
            for n, source in enumerate(sources, 1):
                cells = "".join(f"<td>{html.escape(fmt(source.get(key)))}</td>" for key, _ in shown)
                parts.append(
                    f"<tr><td>{n}</td><td>{html.escape(str(source.get('id')))}</td>"
                    f"<td>{html.escape(fmt(source.get('score')))}</td>{cells}"
                    f'<td style="text-align:left">{html.escape(str(source.get("snippet", "")))}</td></tr>'
                )
            parts.append("</tbody></table>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def answers_text(frame) -> str:
    """The same as plain text: ``Q:``, ``A:``, the faithfulness and one
    ``[n] id (score; vector v, keyword k) snippet`` line per source."""
    blocks = []
    for row in frame.to_dict("records"):
        lines = [f"Q: {row['question']}", f"A: {row['answer']}"] + ([f"   {_faithfulness(row)}"] if _faithfulness(row) else [])
        for n, source in enumerate(_sources(row), 1):
            scores = "; ".join([fmt(source.get("score"))] + [f"{label} {fmt(source[key])}" for key, label in PARTS if key in source])
            lines.append(f"  [{n}] {source.get('id')} ({scores}) {source.get('snippet', '')}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def scores_chart(frame) -> bytes | None:
    """The score that ranked every source, per question, in rank order, as a PNG bar chart."""
    from .charts import bar_chart

    scores = {
        f"Q{q} [{n}] {source.get('id')}": float(source["score"])
        for q, row in enumerate(frame.to_dict("records"), 1)
        for n, source in enumerate(_sources(row), 1)
        if source.get("score") is not None
    }
    label = SCORE.get(frame.attrs.get("search"), "score")
    return bar_chart(scores, "retrieval score of each source, in rank order", label, ordered=True) if scores else None


def show_answers(frame) -> None:
    """Display the answers as one output: text/html (with the score chart), PNG, text/plain."""
    from IPython.display import display

    from .render import png_html

    bundle = {"text/html": answers_html(frame), "text/plain": answers_text(frame)}
    png = scores_chart(frame)
    if png:
        bundle["image/png"] = png
        bundle["text/html"] += png_html(png, "retrieval scores")
    display(bundle, raw=True)
