"""LlamaBoard's loss plot of a method's run: the figure of its ``training.png`` (:mod:`.training_plot`: losses solid on
the left axis, the method's terms dashed on the right one, raw values faint and smoothed bold, every legend outside
the axes so that it covers no curve), drawn from the ``trainer_log.jsonl`` lines LlamaBoard passes with LlamaBoard's
own smoothing."""

from __future__ import annotations

from typing import Any

from llamafactory_hera.anatomy.panel_spec import LossPlot
from llamafactory_hera.anatomy.training_plot import COLORS, TrainingPlot, draw_training, series

LOSS_COLOR = COLORS[0]  # LlamaBoard's colour of the loss


def loss_with_terms_figure(trainer_log: list[dict[str, Any]], smooth: Any, plot: LossPlot) -> Any:
    """The loss of the logged steps and each of ``plot.terms`` where logged (None when neither was)."""
    data = series((log.get("current_steps"), log) for log in trainer_log)
    return draw_training(data, TrainingPlot(terms=tuple(plot.terms), terms_label=plot.axis_label), smooth)
