"""Run display: live widgets, in-place static HTML, or text lines; and the charts."""

from .render import Summary
from .run import RunDisplay, make_display, summary_bundle

__all__ = ["RunDisplay", "Summary", "make_display", "summary_bundle"]
