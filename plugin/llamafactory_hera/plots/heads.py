"""Head-selection figures and text tables: layers run down, heads across."""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

import numpy as np

from llamafactory_hera.plots.text import agg_figure, fit_title, number, save_png, signed_number

_MAX_TICKS = 20
_MAX_LABELS = 40  # beyond this, boxes without labels (they would bury the map)
_MAX_ANNOTATED_CELLS = 256  # maps this small write each cell's value; boxes suffice
_BOX_COLOR = "#e4002b"
_DIFF_BOX_COLOR = "black"


def _check(scores: np.ndarray, selected: list[tuple[int, int]], name: str) -> np.ndarray:
    array = np.asarray(scores, dtype=float)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"{name} must be a [layers, heads] array, got shape {array.shape}")
    layers, heads = array.shape
    for layer, head in selected:
        if not (0 <= layer < layers and 0 <= head < heads):
            raise ValueError(f"selected head L{layer}H{head} is outside the {layers} x {heads} {name} map")
    return array


def _map_size(layers: int, heads: int, max_side: float) -> tuple[float, float]:
    """Map (width, height) in inches: square cells <= 0.3 in, longer side <= ``max_side``."""
    cell = min(0.3, max_side / heads, max_side / layers)
    return max(cell * heads, 2.6), max(cell * layers, 2.2)


def _ticks(ax: Any, layers: int, heads: int) -> None:
    for count, set_ticks, set_labels in (
        (heads, ax.set_xticks, ax.set_xticklabels),
        (layers, ax.set_yticks, ax.set_yticklabels),
    ):
        step = max(1, math.ceil(count / _MAX_TICKS))
        positions = list(range(0, count, step))
        set_ticks(positions)
        set_labels([str(p) for p in positions], fontsize=7)
    ax.set_xlabel("head", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.tick_params(length=2, pad=1.5)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    if finite.size == 0:
        return 0.0, 1.0
    low = min(0.0, float(finite.min()))
    high = float(finite.max())
    return (low, high) if high > low else (low, low + 1e-6)


def _boxes(ax: Any, selected: list[tuple[int, int]], color: str) -> None:
    # lazy: `data check` prints this module's text tables without matplotlib
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    for layer, head in selected:
        box = Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor=color, linewidth=1.6, zorder=3)
        box.set_path_effects([patheffects.Stroke(linewidth=3.2, foreground="white"), patheffects.Normal()])
        ax.add_patch(box)


def _labels(ax: Any, selected: list[tuple[int, int]], heads: int, fontsize: float) -> None:
    if len(selected) > _MAX_LABELS:
        return
    for layer, head in selected:
        side = 1 if head < heads / 2 else -1
        ax.annotate(
            f"L{layer}H{head}",
            (head + 0.5 * side, layer),
            xytext=(3 * side, 0),
            textcoords="offset points",
            ha="left" if side > 0 else "right",
            va="center",
            fontsize=fontsize,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85},
        )


def _annotate_cells(ax: Any, array: np.ndarray, signed: bool) -> None:
    image = ax.get_images()[0]
    for (layer, head), value in np.ndenumerate(array):
        if not np.isfinite(value):
            continue
        r, g, b, _ = image.cmap(image.norm(value))
        color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
        ax.text(
            head,
            layer,
            signed_number(value) if signed else number(value),
            ha="center",
            va="center",
            fontsize=7,
            color=color,
        )


def _hatch(ax: Any, cells: np.ndarray) -> None:
    # lazy: matplotlib, only when a figure is drawn
    from matplotlib.patches import Rectangle

    for layer, head in zip(*np.nonzero(cells), strict=True):
        ax.add_patch(
            Rectangle(
                (head - 0.5, layer - 0.5), 1, 1, fill=False, hatch="//", edgecolor=(0, 0, 0, 0.3), linewidth=0, zorder=2
            )
        )


def _legend(fig: Any, entries: list[tuple[Any, str]]) -> None:
    """A handle is a box colour, a tuple of them (one handle), or ``"hatch"``."""
    # lazy: matplotlib only when a figure is drawn
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch

    def patch(color: str) -> Any:
        if color == "hatch":
            return Patch(facecolor="white", edgecolor=(0, 0, 0, 0.45), hatch="//", linewidth=0.8)
        return Patch(facecolor="none", edgecolor=color, linewidth=1.6)

    handles = [tuple(patch(c) for c in colors) if isinstance(colors, tuple) else patch(colors) for colors, _ in entries]
    fig.legend(
        handles,
        [label for _, label in entries],
        loc="outside lower center",
        ncols=len(entries),
        fontsize=8,
        frameon=False,
        handler_map={tuple: HandlerTuple(ndivide=None, pad=0.3)},
    )


def _label_fontsize(heads: int, map_width: float) -> float:
    cell_pt = 72 * map_width / heads
    return float(min(8.0, max(5.5, cell_pt * 0.9)))


def plot_head_heatmap(scores: np.ndarray, selected: list[tuple[int, int]], path: Path, title: str) -> Path:
    """``scores`` ``[L, H]``; colorbar from 0 to the highest score, NaN cells blank."""
    array = _check(scores, selected, "scores")
    layers, heads = array.shape
    width, height = _map_size(layers, heads, 10.0)
    fig = agg_figure(figsize=(width + 1.6, height + 1.0))
    ax = fig.subplots()
    low, high = _limits(array)
    image = ax.imshow(
        array, cmap="viridis", vmin=low, vmax=high, aspect="auto", interpolation="nearest", origin="upper"
    )
    fig.colorbar(image, ax=ax, label="MKNN", fraction=0.05, pad=0.02)
    _ticks(ax, layers, heads)
    fit_title(fig, fig.suptitle(title, fontsize=10), title)
    _boxes(ax, selected, _BOX_COLOR)
    if selected:
        _legend(fig, [(_BOX_COLOR, "selected heads")])
    if layers * heads <= _MAX_ANNOTATED_CELLS:
        _annotate_cells(ax, array, signed=False)
    else:
        _labels(ax, selected, heads, _label_fontsize(heads, width))
    return save_png(fig, path, dpi=150)


def plot_before_after(
    before: np.ndarray,
    after: np.ndarray,
    selected: list[tuple[int, int]],
    path: Path,
    title: str,
    box_label: str = "selected heads",
    noise: np.ndarray | None = None,
    noise_label: str = "within noise",
) -> Path:
    """Before, after and after - before (diverging); ``noise`` (``[layers, heads]`` bool) hatches differences within
    noise."""
    first = _check(before, selected, "before")
    second = _check(after, selected, "after")
    if first.shape != second.shape:
        raise ValueError(f"before {first.shape} and after {second.shape} must have the same [layers, heads] shape")
    layers, heads = first.shape
    width, height = _map_size(layers, heads, 5.5)
    fig = agg_figure(figsize=(3 * width + 2.6, height + 1.3))
    axes = fig.subplots(1, 3)
    low, high = _limits(first, second)
    for ax, array, name in ((axes[0], first, "before"), (axes[1], second, "after")):
        image = ax.imshow(array, cmap="viridis", vmin=low, vmax=high, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10)
    fig.colorbar(image, ax=axes[:2], label="MKNN", fraction=0.05, pad=0.02, shrink=0.9)
    diff = second - first
    finite = np.abs(diff[np.isfinite(diff)])
    bound = float(finite.max()) if finite.size and finite.max() > 0 else 1e-6
    diff_image = axes[2].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    axes[2].set_title("after \u2212 before", fontsize=10)
    fig.colorbar(diff_image, ax=axes[2], label="\u0394 MKNN", fraction=0.05, pad=0.02)
    for ax, color in zip(axes, (_BOX_COLOR, _BOX_COLOR, _DIFF_BOX_COLOR), strict=True):
        _ticks(ax, layers, heads)
        _boxes(ax, selected, color)
    entries: list[tuple[Any, str]] = [((_BOX_COLOR, _DIFF_BOX_COLOR), box_label)] if selected else []
    if noise is not None:
        if np.shape(noise) != first.shape:
            raise ValueError(f"noise {np.shape(noise)} must have the maps' [layers, heads] shape {first.shape}")
        _hatch(axes[2], np.asarray(noise, dtype=bool))
        entries.append(("hatch", noise_label))
    if entries:
        _legend(fig, entries)
    fit_title(fig, fig.suptitle(title, fontsize=11), title)
    if layers * heads <= _MAX_ANNOTATED_CELLS:
        for ax, array in ((axes[0], first), (axes[1], second)):
            _annotate_cells(ax, array, signed=False)
        _annotate_cells(axes[2], diff, signed=True)
    else:
        _labels(axes[2], selected, heads, _label_fontsize(heads, width))
    return save_png(fig, path, dpi=150)


def plot_score_panels(
    panels: list[tuple[np.ndarray, str]],
    layer_names: list[int],
    marked: list[tuple[int, int]],
    rolled_back: list[tuple[int, int]],
    path: Path,
    title: str,
    box_labels: tuple[str, str] = ("marked", "rolled back"),
) -> Path:
    """Per-head score maps ``[L, H]``, each on its own colour scale; row i is layer ``layer_names[i]``."""
    row = {layer: index for index, layer in enumerate(layer_names)}
    boxes = [(row[layer], head) for layer, head in marked], [(row[layer], head) for layer, head in rolled_back]
    arrays = [_check(array, boxes[0] + boxes[1], label) for array, label in panels]
    layers, heads = arrays[0].shape
    width, height = _map_size(layers, heads, 5.5)
    fig = agg_figure(figsize=(len(arrays) * (width + 1.3), height + 1.3))
    for ax, array, (_, label) in zip(fig.subplots(1, len(arrays), squeeze=False)[0], arrays, panels, strict=True):
        low = float(np.nanmin(array))
        high = float(np.nanmax(array))
        image = ax.imshow(
            array,
            cmap="viridis",
            vmin=low,
            vmax=high if high > low else low + 1e-6,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, label=label, fraction=0.05, pad=0.02)
        _ticks(ax, layers, heads)
        ax.set_yticklabels([str(layer_names[int(tick)]) for tick in ax.get_yticks()], fontsize=7)
        _boxes(ax, boxes[0], _BOX_COLOR)
        _boxes(ax, boxes[1], _DIFF_BOX_COLOR)
        if layers * heads <= _MAX_ANNOTATED_CELLS:
            _annotate_cells(ax, array, signed=True)
    entries = [
        (color, label)
        for color, label, cells in zip((_BOX_COLOR, _DIFF_BOX_COLOR), box_labels, boxes, strict=True)
        if cells
    ]
    if entries:
        _legend(fig, entries)
    fit_title(fig, fig.suptitle(title, fontsize=11), title)
    return save_png(fig, path, dpi=150)


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, float | np.floating):
        return number(float(value), 4)
    return str(value)


def format_head_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    """Fixed-width text table; floats with 4 decimals, all-number columns right-aligned, no trailing spaces."""
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in cells]) for i, column in enumerate(columns)]
    right = [
        bool(rows)
        and all(
            isinstance(value, numbers.Number) and not isinstance(value, bool | np.bool_)
            for row in rows
            if (value := row.get(column)) is not None
        )
        for column in columns
    ]

    def render(values: list[str]) -> str:
        parts = [value.rjust(w) if r else value.ljust(w) for value, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    lines = [render(list(columns)), "  ".join("-" * w for w in widths)]
    lines.extend(render(line) for line in cells)
    return "\n".join(lines)
