"""LlamaBoard's loss plot for a method's run: the loss (raw faint, smoothed solid, as LlamaBoard draws it) with the
method's logged terms on a second axis, and the legend outside the axes so that it covers no curve.

LlamaBoard's stock plot puts the legend at ``loc="best"``, which only weighs the first axes' lines: with a second
axis the legend could sit on the terms' curves. Here it stands above the axes (constrained layout keeps it inside
the figure), so every data point stays visible. matplotlib is imported when a figure is drawn.
"""

from __future__ import annotations

from typing import Any

from llamafactory_hera.anatomy.panel_spec import LossPlot

LOSS_COLOR = "#1f77b4"  # LlamaBoard's colour of the loss


def loss_with_terms_figure(trainer_log: list[dict[str, Any]], smooth: Any, plot: LossPlot) -> Any:
    """The loss of the logged steps and each of ``plot.terms`` (log key -> colour) where logged, smoothed with
    LlamaBoard's ``smooth``; one legend for both axes, above them."""
    import matplotlib.pyplot as plt

    plt.close("all")
    plt.switch_backend("agg")
    fig = plt.figure(layout="constrained")
    ax = fig.add_subplot(111)
    steps, losses = [], []
    terms: dict[str, tuple[list[Any], list[float]]] = {key: ([], []) for key in plot.terms}
    for log in trainer_log:
        if log.get("loss", None):
            steps.append(log["current_steps"])
            losses.append(log["loss"])
            for key, (term_steps, values) in terms.items():
                if log.get(key) is not None:
                    term_steps.append(log["current_steps"])
                    values.append(log[key])

    ax.plot(steps, losses, color=LOSS_COLOR, alpha=0.4, label="loss")
    ax.plot(steps, smooth(losses), color=LOSS_COLOR, label="loss (smoothed)")
    ax2 = ax.twinx()
    for key, (term_steps, values) in terms.items():
        if not values:
            continue
        if plot.raw_terms:
            ax2.plot(term_steps, values, color=plot.terms[key], alpha=0.4, label=key)
        ax2.plot(term_steps, smooth(values), color=plot.terms[key], label=f"{key} (smoothed)")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    fig.legend(handles + handles2, labels + labels2, loc="outside upper center", ncols=min(3, len(labels + labels2)),
               fontsize="small", frameon=False)
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color=LOSS_COLOR)
    ax2.set_ylabel(plot.axis_label, **({"color": plot.axis_color} if plot.axis_color else {}))
    return fig
