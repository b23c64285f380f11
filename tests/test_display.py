"""Run display: pure rendering functions, the text display, throttling, the summary bundle."""

import io

import pandas as pd

from nbcustom.display import Summary, make_display, summary_bundle
from nbcustom.display import render
from nbcustom.display.charts import before_after_chart, before_after_figure, loss_chart
from nbcustom.display.run import RunDisplay, TextDisplay

PNG = b"\x89PNG\r\n\x1a\n"


def test_metrics_html_shows_deltas_coloured_by_direction():
    html = render.metrics_html({"accuracy": 0.5, "eval_loss": 2.0}, {"accuracy": 0.75, "eval_loss": 1.5}, "v1", "v2")
    assert "<th>v1</th><th>v2</th>" in html
    assert '<span style="color:#1a7f37">+0.25</span>' in html  # accuracy up: good
    assert '<span style="color:#1a7f37">-0.5</span>' in html  # loss down: good
    assert render.metrics_html({}, {}) == ""


def test_metrics_text_aligns_columns():
    text = render.metrics_text({"rmse": 3.0}, {"rmse": 4.0})
    assert text.splitlines() == [
        "metric      before       after       delta",
        "rmse             3           4          +1",
    ]


def test_better_knows_lower_is_better_metrics():
    assert render.better("perplexity", -1.0) is True
    assert render.better("exact_match", -0.1) is False
    assert render.better("rmse", 0) is None


def test_fmt_and_duration():
    assert render.fmt(1234567) == "1,234,567"
    assert render.fmt(0.123456) == "0.1235"
    assert render.fmt(1e-5) == "1.000e-05"
    assert render.duration(75) == "01:15" and render.duration(3725) == "1:02:05"


def test_progress_text_and_html():
    state = render.ProgressState("%%finetune bot", "training", step=25, total=100, elapsed=10.0, metrics={"loss": 1.5})
    assert render.progress_text(state) == "%%finetune bot | training | step 25/100 | elapsed 00:10 | eta 00:30 | loss 1.5"
    assert 'width:25.0%' in render.progress_html(state)


def test_summary_html_and_text_hold_everything():
    summary = Summary(
        "%%retrain m -> v2", {"acc": 0.5}, {"acc": 0.6}, facts={"version": 2, "trained": 100},
        tables={"examples": pd.DataFrame({"prompt": ["<b>x</b>"], "after": ["y"]})}, charts={"loss": PNG}, notes=["note!"],
    )
    html = render.summary_html(summary)
    assert "%%retrain m -&gt; v2" in html and "&lt;b&gt;x&lt;/b&gt;" in html and "data:image/png;base64," in html
    assert "note!" in html and "<b>trained</b> 100" in html
    text = render.summary_text(summary)
    assert text.startswith("%%retrain m -> v2\nversion: 2  trained: 100") and "examples:" in text
    bundle = summary_bundle(summary)
    assert set(bundle) == {"text/html", "text/plain", "image/png"} and bundle["image/png"] == PNG


def test_text_display_prints_one_line_per_phase_and_log():
    out = io.StringIO()
    d = TextDisplay("%%finetune bot", stream=out)
    d.phase("training")
    for i in range(1, 501):
        d.step(i, 500, loss=1.0 / i)
    d.log("epoch 1: eval_loss 0.5")
    d.finish(Summary("done", {"acc": 0.1}, {"acc": 0.9}))
    lines = out.getvalue().splitlines()
    assert lines[0] == "%%finetune bot: training"
    assert "%%finetune bot: epoch 1: eval_loss 0.5" in lines
    assert len(lines) < 15  # steps are throttled, not 500 lines
    assert d.losses[-1] == (500, 1.0 / 500)


def test_steps_are_throttled():
    shown = []

    class Counting(RunDisplay):
        def _show(self):
            shown.append(self.state.step)

    d = Counting("x")
    for i in range(1, 1001):
        d.step(i, 1000)
    assert shown[-1] == 1000  # the final step is always shown
    assert len(shown) < 10


def test_make_display_outside_a_kernel_is_text():
    assert type(make_display("auto", "x")) is TextDisplay


def test_charts_are_png():
    assert loss_chart([1, 2, 3], [3.0, 2.0, 1.0], [3], [1.5]).startswith(PNG)
    assert before_after_chart({"a": 1.0}, {"a": 2.0}).startswith(PNG)


def test_before_after_chart_gives_each_metric_its_own_scale_and_marks_lower_is_better():
    before = {"perplexity": 21.0, "exact_match": 0.1, "token_f1": 0.3, "rouge_l": 0.25, "note": "text"}
    after = {"perplexity": 3.0, "exact_match": 0.4, "token_f1": 0.6, "rouge_l": 0.55, "note": "text"}
    fig = before_after_figure(before, after, "%%finetune bot", "base", "v1")
    axes = fig.get_axes()
    assert [ax.get_title() for ax in axes] == ["perplexity\n(lower is better)", "exact_match", "token_f1", "rouge_l"]
    for ax in axes:
        heights = [bar.get_height() for bar in ax.patches]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "v1"] and len(heights) == 2
        assert ax.get_ylim()[1] >= max(heights) and ax.get_ylim()[1] < 2 * max(heights)  # its own scale
    assert axes[0].get_ylim()[1] > 20 and axes[1].get_ylim()[1] < 1
    assert before_after_chart(before, after).startswith(PNG)
