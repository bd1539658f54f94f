"""What every figure of the plugin shares: a headless figure, titles that fit it (wrapped on the rendered width, not
on a guess of characters per inch) and numbers without a negative zero."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any


def agg_figure(**kwargs: Any) -> Any:
    """A constrained-layout ``matplotlib.figure.Figure`` on an Agg canvas: headless, and no pyplot state to close."""
    # lazy: matplotlib only when a figure is drawn (the methods' declarations import the plots)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def fit_title(fig: Any, text: Any, title: str, margin: float = 0.96) -> None:
    """Wrap ``title`` into the Text artist ``text`` until it is at most ``margin`` of ``fig``'s width when drawn
    (long words, such as paths, broken too); ``text`` must be centred on the figure (``fig.suptitle``), not on
    shifted axes."""
    renderer = fig.canvas.get_renderer()
    limit = fig.bbox.width * margin
    width = max(len(line) for line in title.splitlines() or [""])
    while True:
        text.set_text("\n".join(textwrap.fill(line, width) for line in title.splitlines()))
        if width <= 8 or text.get_window_extent(renderer).width <= limit:
            return
        width = int(width * 0.9)


def signed_number(value: float, digits: int = 3) -> str:
    """``value`` with an explicit sign and ``digits`` decimals, a value that rounds to zero as plain ``0.000``
    (never ``-0.000`` nor ``+0.000``: a sign on a zero says nothing)."""
    rounded = round(float(value), digits)
    return f"{0.0:.{digits}f}" if rounded == 0 else f"{rounded:+.{digits}f}"


def number(value: float, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; a negative value that rounds to zero is ``0.000``, not ``-0.000``."""
    rounded = round(float(value), digits)
    return f"{(0.0 if rounded == 0 else rounded):.{digits}f}"
