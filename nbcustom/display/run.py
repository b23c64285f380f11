"""The run display engines report to: phases, throttled steps, epoch lines, final summary.

``RunDisplay`` keeps the state and renders nothing; ``TextDisplay``, ``StaticDisplay`` and
``WidgetDisplay`` show it in a log, in place in a notebook, or in live widgets. Every
notebook display ends with the static summary (HTML + PNG + text/plain), shown once, so
saved notebooks stay readable without widget state.
"""

from __future__ import annotations

import sys
import time

from . import render
from .render import ProgressState, Summary

UIS = ("auto", "widgets", "static", "text", "none")


class RunDisplay:
    """Records progress; shows nothing (``ui="none"``). Subclasses decide how to show it."""

    interval = 0.5  # seconds between in-place updates

    def __init__(self, title: str):
        self.state = ProgressState(title)
        self.started = time.monotonic()
        self.losses: list[tuple[int, float]] = []
        self.eval_losses: list[tuple[int, float]] = []
        self.lines: list[str] = []
        self._last = 0.0

    # --- what engines call -------------------------------------------------------------
    def phase(self, name: str) -> None:
        """A new phase of the run ("loading model", "training", "evaluating before"...)."""
        self.state.phase = name
        self.state.step, self.state.total, self.state.metrics = 0, None, {}
        self._tick()
        self._on_line(f"{self.state.title}: {name}")
        self._refresh(force=True)

    def step(self, step: int, total: int | None = None, **metrics: float) -> None:
        """Progress within the phase; ``loss`` is also kept for the loss chart."""
        self.state.step = step
        if total is not None:
            self.state.total = total
        self.state.metrics = {**self.state.metrics, **metrics}
        if "loss" in metrics:
            self.losses.append((step, float(metrics["loss"])))
        if "eval_loss" in metrics:
            self.eval_losses.append((step, float(metrics["eval_loss"])))
        self._tick()
        self._refresh(force=total is not None and step >= total)

    def log(self, line: str) -> None:
        """One line worth keeping (an epoch's result, a skipped model...)."""
        self.lines.append(line)
        self._on_line(f"{self.state.title}: {line}")
        self._refresh(force=True)

    def finish(self, summary: Summary) -> None:
        """The run is done: show the summary."""
        self.state.phase = "done"
        self._tick()
        self._refresh(force=True)
        self._on_summary(summary)

    def fail(self, error: BaseException) -> None:
        """The run stopped; the error itself is raised by the caller."""
        self.state.phase = f"stopped: {type(error).__name__}"
        self._tick()
        self._refresh(force=True)

    # --- helpers for subclasses --------------------------------------------------------
    def loss_chart(self) -> bytes | None:
        if len(self.losses) < 2:
            return None
        from .charts import loss_chart

        return loss_chart(*zip(*self.losses), *(zip(*self.eval_losses) if self.eval_losses else ((), ())))

    def _tick(self) -> None:
        self.state.elapsed = time.monotonic() - self.started

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            self._show()

    def _show(self) -> None:
        pass

    def _on_line(self, line: str) -> None:
        pass

    def _on_summary(self, summary: Summary) -> None:
        pass


class TextDisplay(RunDisplay):
    """One line per phase and epoch, for scripts and logs; a step line at most every 30 s."""

    interval = 30.0

    def __init__(self, title: str, stream=None):
        super().__init__(title)
        self.stream = stream or sys.stdout
        self._last = time.monotonic()

    def _on_line(self, line: str) -> None:
        print(line, file=self.stream, flush=True)

    def _show(self) -> None:
        if self.state.step and self.state.phase != "done":
            print(render.progress_text(self.state), file=self.stream, flush=True)

    def _on_summary(self, summary: Summary) -> None:
        print(render.summary_text(summary), file=self.stream, flush=True)


def summary_bundle(summary: Summary) -> dict:
    """The static summary as one display output: HTML (with charts), PNG and text/plain."""
    bundle = {"text/html": render.summary_html(summary), "text/plain": render.summary_text(summary)}
    if summary.charts:
        bundle["image/png"] = next(iter(summary.charts.values()))
    return bundle


class StaticDisplay(RunDisplay):
    """One progress line updated in place (a display handle), then the static summary."""

    def __init__(self, title: str):
        super().__init__(title)
        self._handle = None

    def _bundle(self) -> dict:
        return {"text/html": render.progress_html(self.state), "text/plain": render.progress_text(self.state)}

    def _show(self) -> None:
        from IPython.display import display

        if self._handle is None:
            self._handle = display(self._bundle(), raw=True, display_id=True)
        else:
            self._handle.update(self._bundle(), raw=True)

    def _on_summary(self, summary: Summary) -> None:
        from IPython.display import display

        display(summary_bundle(summary), raw=True)


class WidgetDisplay(StaticDisplay):
    """Live ipywidgets panel while the run goes: progress bar with step/ETA/metrics, the
    loss chart and the last log lines. At the end the panel's output is replaced, in place,
    by the static summary (or, on failure, the final progress line): a live notebook shows
    the result once, and a saved notebook holds it without widget state."""

    chart_interval = 3.0

    def __init__(self, title: str):
        super().__init__(title)
        import ipywidgets as w

        self.bar = w.IntProgress(value=0, min=0, max=1, layout=w.Layout(width="60%"))
        self.status = w.HTML()
        self.chart = w.Image(format="png", layout=w.Layout(max_width="560px"))
        self.chart.layout.display = "none"
        self.log_box = w.HTML()
        row = w.HBox([self.bar, self.status])
        self.panel = w.VBox([w.HTML(f"<b>{title}</b>"), row, self.chart, self.log_box])
        self._widgets = [self.panel, *self.panel.children, *row.children]
        self._chart_at = 0.0

    def _show(self) -> None:
        if self._handle is None:
            from IPython.display import display

            self._handle = display(self.panel, display_id=True)
        state = self.state
        self.bar.max = max(state.total or 1, 1)
        self.bar.value = min(state.step, self.bar.max) if state.total else (self.bar.max if state.phase == "done" else 0)
        self.bar.bar_style = "success" if state.phase == "done" else ("danger" if state.phase.startswith("stopped") else "")
        self.status.value = f"<code>{render.progress_text(state)}</code>"
        self.log_box.value = "<br>".join(f"<code>{line}</code>" for line in self.lines[-5:])
        now = time.monotonic()
        if now - self._chart_at >= self.chart_interval or state.phase == "done":
            png = self.loss_chart()
            if png:
                self.chart.value, self.chart.layout.display = png, None
                self._chart_at = now

    def _on_summary(self, summary: Summary) -> None:
        self._replace(summary_bundle(summary))

    def fail(self, error: BaseException) -> None:
        super().fail(error)
        self._replace(self._bundle())

    def _replace(self, bundle: dict) -> None:
        """Put ``bundle`` where the panel was and close the panel's widgets."""
        if self._handle is not None:
            self._handle.update(bundle, raw=True)
        for widget in self._widgets:
            widget.close()


def make_display(ui: str, title: str) -> RunDisplay:
    """The display for ``ui`` (auto: widgets in a kernel, text elsewhere)."""
    if ui not in UIS:
        from ..errors import NbCustomError

        raise NbCustomError(f"unknown ui {ui!r}: use one of {', '.join(UIS)}")
    if ui == "auto":
        ui = _auto()
    return {"widgets": WidgetDisplay, "static": StaticDisplay, "text": TextDisplay, "none": RunDisplay}[ui](title)


def _auto() -> str:
    try:
        from IPython import get_ipython
    except ImportError:
        return "text"
    shell = get_ipython()
    if shell is None or not hasattr(shell, "kernel"):
        return "text"
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return "static"
    return "widgets"
