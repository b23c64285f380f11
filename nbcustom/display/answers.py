"""Answers with their sources (``%%rag NAME --ask``): pure HTML / text renderers and one
display call that shows both, so a saved notebook stays readable."""

from __future__ import annotations

import html

from .render import fmt


def _sources(row) -> list[dict]:
    sources = row.get("sources")
    return list(sources) if sources is not None else []


def answers_html(frame) -> str:
    """Each question, its answer and a table of its sources (id, score, snippet)."""
    parts = ['<div class="nbc-answers">']
    for row in frame.to_dict("records"):
        parts.append(
            f'<div style="margin-bottom:1em"><p><b>Q:</b> {html.escape(str(row["question"]))}</p>'
            f'<p><b>A:</b> {html.escape(str(row["answer"]))}</p>'
        )
        sources = _sources(row)
        if sources:
            parts.append('<table class="nbc-table"><thead><tr><th>#</th><th>id</th><th>score</th><th>snippet</th></tr></thead><tbody>')
            for n, source in enumerate(sources, 1):
                parts.append(
                    f"<tr><td>{n}</td><td>{html.escape(str(source.get('id')))}</td>"
                    f"<td>{html.escape(fmt(source.get('score')))}</td>"
                    f'<td style="text-align:left">{html.escape(str(source.get("snippet", "")))}</td></tr>'
                )
            parts.append("</tbody></table>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def answers_text(frame) -> str:
    """The same as plain text: ``Q:``, ``A:`` and one ``[n] id (score) snippet`` line per source."""
    blocks = []
    for row in frame.to_dict("records"):
        lines = [f"Q: {row['question']}", f"A: {row['answer']}"]
        for n, source in enumerate(_sources(row), 1):
            lines.append(f"  [{n}] {source.get('id')} ({fmt(source.get('score'))}) {source.get('snippet', '')}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def scores_chart(frame) -> bytes | None:
    """The retrieval score of every source, per question, as a PNG bar chart."""
    from .charts import bar_chart

    scores = {
        f"Q{q} [{n}] {source.get('id')}": float(source["score"])
        for q, row in enumerate(frame.to_dict("records"), 1)
        for n, source in enumerate(_sources(row), 1)
        if source.get("score") is not None
    }
    return bar_chart(scores, "retrieval score of each source", "cosine similarity") if scores else None


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
