"""Per-metric training curves of a HeRA run (``training_<key>.png``, as LLaMA-Factory names its loss plot).

LLaMA-Factory's ``plot_loss`` draws on a fixed canvas: long tick labels (a temperature that moves in its fourth
digit, ``0.070275``) and long run folders in the title are cut off at the edges. These figures size themselves to
their labels. The smoothing is the host's own (passed in by the patch), so the curves match LlamaBoard's.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from llamafactory_hera.anatomy.plot_text import fit_title

Smooth = Callable[[list[float]], list[float]]
LABELS = {"lm_loss": "language-model loss", "hera_loss": "HeRA loss (InfoNCE)",
          "hera_temperature": "HeRA temperature (tau)"}


def metric_series(log_history: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of every ``log_history`` entry that has ``key``."""
    rows = [(entry["step"], float(entry[key])) for entry in log_history if key in entry]
    return [step for step, _ in rows], [value for _, value in rows]


def draw_metric(steps: list[int], values: list[float], key: str, run_name: str, smooth: Smooth) -> Figure:
    """One curve (raw and smoothed) on a figure whose margins fit every label; not yet saved."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(steps, values, color="#1f77b4", alpha=0.4, label="original")
    ax.plot(steps, smooth(list(values)), color="#1f77b4", label="smoothed")
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    ax.set_xlabel("step")
    ax.set_ylabel(LABELS.get(key, key))
    title = f"training {key}\n{run_name}"
    fit_title(fig, fig.suptitle(title, fontsize=10), title)
    ax.legend()
    return fig


def plot_run_metrics(output_dir: str | Path, keys: Sequence[str], smooth: Smooth) -> tuple[list[Path], list[str]]:
    """Write ``training_<key>.png`` for every key logged in ``output_dir/trainer_state.json``.

    Returns (written paths, keys that were never logged).
    """
    output_dir = Path(output_dir)
    history = json.loads((output_dir / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    written, missing = [], []
    for key in keys:
        steps, values = metric_series(history, key)
        if not values:
            missing.append(key)
            continue
        path = output_dir / f"training_{key.replace('/', '_')}.png"
        draw_metric(steps, values, key, output_dir.name, smooth).savefig(path, format="png", dpi=100)
        written.append(path)
    return written, missing
