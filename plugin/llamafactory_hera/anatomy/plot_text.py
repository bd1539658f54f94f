"""Titles that fit their figure: wrapped on the rendered width, not on a guess of characters per inch."""

from __future__ import annotations

import textwrap
from typing import Any


def fit_title(fig: Any, text: Any, title: str, margin: float = 0.96) -> None:
    """Wrap ``title`` into the Text artist ``text`` until it is at most ``margin`` of ``fig``'s width when drawn.

    ``text`` must be centred on the figure (``fig.suptitle(...)``; an axes title is centred on its axes, which
    margins and colorbars shift); long words (paths) are broken too.
    """
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width * margin
    width = max(len(line) for line in title.splitlines() or [""])
    while True:
        text.set_text("\n".join(textwrap.fill(line, width) for line in title.splitlines()))
        if width <= 8 or text.get_window_extent(renderer).width <= limit:
            return
        width = int(width * 0.9)
