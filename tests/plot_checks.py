"""Where a matplotlib figure's legend stands against the data it draws, measured on the rendered figure.

Used by the LlamaBoard tests in this process and inside their LlamaBoard subprocesses (``sys.path`` gets this folder).
"""

from __future__ import annotations

from typing import Any


def legend_clearance(fig: Any) -> dict[str, Any]:
    """The figure's legends against its data, in display (pixel) coordinates after a draw.

    ``legends``: how many; ``covered_points``: data points of every line of every axes inside a legend's box;
    ``over_axes``: whether a legend's box overlaps an axes' box (where curves may be drawn); ``inside_figure``:
    whether every legend's box lies within the figure (LlamaBoard shows the figure as it is drawn, not cropped).
    """
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    points = [xy for ax in fig.axes for line in ax.get_lines()
              for xy in line.get_transform().transform(line.get_xydata())]
    return {
        "legends": len(legends),
        "covered_points": sum(1 for x, y in points for box in boxes if box.contains(x, y)),
        "points": len(points),
        "over_axes": any(box.overlaps(ax.get_window_extent(renderer)) for box in boxes for ax in fig.axes),
        "inside_figure": all(fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0
                             and box.y1 <= fig.bbox.y1 for box in boxes),
    }
