"""Shared by all figures: a headless figure, titles wrapped on their rendered width, numbers without ``-0``."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def agg_figure(**kwargs: Any) -> Any:
    """Headless, no pyplot state to close."""
    # lazy: the methods' declarations import the plots
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def fit_title(fig: Any, text: Any, title: str) -> None:
    """Wrap ``title`` into ``text`` (centred on ``fig``) until it spans at most 96 % of the figure's width."""
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width * 0.96
    width = max(len(line) for line in title.splitlines() or [""])
    while True:
        text.set_text("\n".join(textwrap.fill(line, width) for line in title.splitlines()))
        if width <= 8 or text.get_window_extent(renderer).width <= limit:
            return
        width = int(width * 0.9)


def signed_number(value: float, digits: int = 3) -> str:
    rounded = round(float(value), digits)
    return f"{0.0:.{digits}f}" if rounded == 0 else f"{rounded:+.{digits}f}"


def number(value: float, digits: int = 3) -> str:
    rounded = round(float(value), digits)
    return f"{(0.0 if rounded == 0 else rounded):.{digits}f}"
