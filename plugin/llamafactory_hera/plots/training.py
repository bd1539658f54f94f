"""A run's ``training.png`` and LlamaBoard's loss plot of a method's run, with the host's smoothing."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamafactory_hera.plots.text import agg_figure, fit_title, save_png
from llamafactory_hera.runtime.log import say

Smooth = Callable[[list[float]], list[float]]
TRAINING_PNG = "training.png"
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


@dataclass(frozen=True)
class Panel:
    """Drawn when one of its series was logged. ``prefix``: keys with it drawn thin and faint (e.g. one per head)."""

    title: str
    ylabel: str
    keys: tuple[str, ...]
    labels: dict[str, str] = field(default_factory=dict)  # key (or prefix) -> legend label
    prefix: str | None = None
    ylim: tuple[float, float] | None = None


@dataclass(frozen=True)
class TrainingPlot:
    terms: tuple[str, ...]
    terms_label: str
    panels: tuple[Panel, ...] = ()
    losses: tuple[str, ...] = ("loss",)


Series = dict[str, tuple[list[int], list[float]]]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def series(entries: Iterable[tuple[Any, dict[str, Any]]]) -> Series:
    """Numeric key -> (steps, values) of training entries (not ``eval_*``/``predict_*``/``train_*`` summaries) and
    ``eval_loss``."""
    rows: dict[str, dict[int, float]] = {}
    for step, entry in entries:
        if not isinstance(step, int):
            continue
        training = "loss" in entry or not any(key.startswith(("eval_", "predict_", "train_")) for key in entry)
        for key, value in entry.items():
            number = _number(value)
            if number is not None and (training or key == "eval_loss"):
                rows.setdefault(key, {})[step] = number
    skip = {"step", "current_steps", "total_steps", "epoch", "percentage", "lr", "learning_rate", "grad_norm"}
    return {key: (sorted(steps), [steps[s] for s in sorted(steps)]) for key, steps in rows.items() if key not in skip}


def read_series(output_dir: str | Path) -> Series:
    output_dir = Path(output_dir)
    entries: list[tuple[Any, dict[str, Any]]] = []
    state = output_dir / "trainer_state.json"
    if state.is_file():
        entries += [
            (entry.get("step"), entry) for entry in json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
        ]
    log = output_dir / "trainer_log.jsonl"
    if log.is_file():
        lines = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
        entries += [(entry.get("current_steps"), entry) for entry in lines]
    return series(entries)


def integer_steps(ax: Any, steps: list[int], label: str = "step") -> None:
    # lazy: matplotlib, only when a figure is drawn
    from matplotlib.ticker import MaxNLocator

    if len(set(steps)) == 1:
        ax.set_xlim(steps[0] - 1, steps[0] + 1)
        ax.set_xticks([steps[0]])
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _curve(
    ax: Any, series: tuple[list[int], list[float]], color: str, label: str, smooth: Smooth, style: str = "-"
) -> None:
    steps, values = series
    marker = {"marker": "o", "markersize": 3} if len(steps) <= 30 else {}
    ax.plot(steps, values, color=color, alpha=0.35, linewidth=1.0, linestyle=style, **marker)
    ax.plot(steps, smooth(list(values)), color=color, linewidth=1.8, linestyle=style, label=label)


def _loss_panel(ax: Any, data: Series, plot: TrainingPlot, smooth: Smooth) -> list[str]:
    drawn: list[str] = []
    colors = iter(COLORS)
    for key in plot.losses:
        if key in data:
            _curve(ax, data[key], next(colors), key, smooth)
            drawn.append(key)
    if "eval_loss" in data:
        ax.plot(*data["eval_loss"], color="black", marker="s", markersize=5, linestyle=":", label="eval_loss")
        drawn.append("eval_loss")
    ax.set_ylabel("loss")
    handles, labels = ax.get_legend_handles_labels()
    terms = [key for key in plot.terms if key in data]
    if terms:
        twin = ax.twinx()
        for key in terms:
            _curve(twin, data[key], next(colors), key, smooth, style="--")
        twin.set_ylabel(plot.terms_label)
        twin.ticklabel_format(axis="y", useOffset=False, style="plain")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles = handles + more_handles
        labels = labels + more_labels
        drawn.extend(terms)
    ax.set_title("losses (solid: left axis, dashed: right axis)", fontsize=9)
    ax.legend(
        handles,
        labels,
        fontsize=8,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncols=min(3, len(labels)),
        title="faint: as logged, bold: smoothed",
        title_fontsize=8,
        frameon=False,
    )
    return drawn


def _side_panel(ax: Any, data: Series, panel: Panel) -> list[str]:
    drawn: list[str] = []
    faint = sorted(key for key in data if panel.prefix and key.startswith(panel.prefix) and key not in panel.keys)
    for key in faint:
        ax.plot(*data[key], color="#7f7f7f", alpha=0.35, linewidth=0.9)
    if faint:
        name = panel.labels.get(str(panel.prefix), f"{panel.prefix}*")
        ax.plot([], [], color="#7f7f7f", alpha=0.35, linewidth=0.9, label=f"{name} ({len(faint)})")
    for key, color in zip(panel.keys, COLORS, strict=False):
        if key in data:
            steps = data[key][0]
            ax.plot(
                *data[key],
                color=color,
                linewidth=1.8,
                label=panel.labels.get(key, key),
                **({"marker": "o", "markersize": 3} if len(steps) <= 30 else {}),
            )
            drawn.append(key)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_ylabel(panel.ylabel)
    ax.set_title(panel.title, fontsize=9)
    if len(drawn) + bool(faint) > 1:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, frameon=False)
    return drawn + faint


def draw_training(data: Series, plot: TrainingPlot, smooth: Smooth, title: str = "") -> Any:
    panels = [
        panel
        for panel in plot.panels
        if any(key in data for key in panel.keys)
        or (panel.prefix and any(key.startswith(panel.prefix) for key in data))
    ]
    has_losses = any(key in data for key in (*plot.losses, *plot.terms))
    if not has_losses and not panels:
        return None
    widths = [1.6] * has_losses + [1.0] * len(panels)
    fig = agg_figure(figsize=(4.2 * sum(widths) + 1.0, 4.6))
    axes = fig.subplots(1, len(widths), squeeze=False, width_ratios=widths, sharex=True)[0]
    steps: list[int] = []
    if has_losses:
        drawn = _loss_panel(axes[0], data, plot, smooth)
        steps = [s for key in drawn for s in data[key][0]]
    for ax, panel in zip(axes[int(has_losses) :], panels, strict=True):
        drawn = _side_panel(ax, data, panel)
        steps += [s for key in drawn for s in data[key][0]]
    for ax in fig.axes:  # twins share x
        integer_steps(ax, steps)
        ax.grid(alpha=0.25)
    if title:
        fit_title(fig, fig.suptitle(title, fontsize=11), title)
    return fig


def plot_training(
    output_dir: str | Path, stage: str, plot: TrainingPlot, smooth: Smooth
) -> tuple[Path | None, list[str]]:
    """Nothing logged (``max_steps`` below ``logging_steps``): a warning and path None, as the host's ``plot_loss``
    does."""
    output_dir = Path(output_dir)
    data = read_series(output_dir)
    missing = [key for key in (*plot.losses, *plot.terms) if key not in data]
    fig = draw_training(data, plot, smooth, f"{output_dir.name} (stage: {stage}): training")
    if fig is None:
        say(
            f"warning: training plot of {output_dir.name}: no loss, term or panel series was "
            f"logged (was max_steps below logging_steps?); {TRAINING_PNG} not drawn"
        )
        return None, missing
    return save_png(fig, output_dir / TRAINING_PNG, dpi=110), missing
