"""LlamaBoard's loss plot of a HeRA run: the loss with ``hera_loss`` on a second axis, and below it the monitor's
``hera_mknn`` against ``hera_mknn_control`` when logged. LlamaBoard's style; legends outside the axes.
"""

from __future__ import annotations

from typing import Any

from llamafactory_hera.anatomy.panel_plots import LOSS_COLOR, loss_with_terms_figure
from llamafactory_hera.anatomy.panel_spec import LossPlot

HERA_COLOR = "#ff7f0e"  # hera_loss (LlamaBoard draws the total loss in #1f77b4)
MKNN_COLOR = "#2ca02c"  # hera_mknn (the aligned heads' mean); the control heads' in grey, dashed
CONTROL_COLOR = "#7f7f7f"
HERA_TERMS = LossPlot(terms={"hera_loss": HERA_COLOR}, raw_terms=True, axis_label="hera_loss", axis_color=HERA_COLOR)


def series(trainer_log: list[dict[str, Any]], key: str, training_only: bool = False) -> tuple[list[int], list[float]]:
    """(steps, values) of the lines that carry ``key`` (with ``training_only``: lines with a ``loss`` as well)."""
    rows = [(log["current_steps"], float(log[key])) for log in trainer_log
            if log.get(key) is not None and "current_steps" in log and (log.get("loss") or not training_only)]
    return [step for step, _ in rows], [value for _, value in rows]


def hera_loss_figure(trainer_log: list[dict[str, Any]], smooth: Any) -> Any:
    """The figure LlamaBoard shows for a HeRA run (see the module docstring)."""
    mknn_steps, mknn = series(trainer_log, "hera_mknn")
    if not mknn:
        return loss_with_terms_figure(trainer_log, smooth, HERA_TERMS)
    import matplotlib.pyplot as plt

    plt.close("all")
    plt.switch_backend("agg")
    fig = plt.figure(figsize=(6.4, 7.6), layout="constrained")
    ax, low = fig.subplots(2, 1, sharex=True)
    steps, losses = series(trainer_log, "loss", training_only=True)
    hera_steps, hera_losses = series(trainer_log, "hera_loss", training_only=True)
    ax.plot(steps, losses, color=LOSS_COLOR, alpha=0.4, label="loss")
    ax.plot(steps, smooth(losses), color=LOSS_COLOR, label="loss (smoothed)")
    ax2 = ax.twinx()
    ax2.plot(hera_steps, hera_losses, color=HERA_COLOR, alpha=0.4, label="hera_loss")
    ax2.plot(hera_steps, smooth(hera_losses), color=HERA_COLOR, label="hera_loss (smoothed)")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    fig.legend(handles + handles2, labels + labels2, loc="outside upper center", ncols=2, fontsize="small",
               frameon=False)
    ax.set_ylabel("loss", color=LOSS_COLOR)
    ax2.set_ylabel("hera_loss", color=HERA_COLOR)
    low.plot(mknn_steps, mknn, color=MKNN_COLOR, marker="o", markersize=3, label="hera_mknn (aligned heads)")
    control_steps, control = series(trainer_log, "hera_mknn_control")
    if control:
        low.plot(control_steps, control, color=CONTROL_COLOR, linestyle="--", marker="o", markersize=3,
                 label="hera_mknn_control (unaligned heads)")
    low.set_ylim(0.0, 1.0)
    low.set_xlabel("step")
    low.set_ylabel("MKNN with the teacher")
    fig.legend(*low.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize="small", frameon=False)
    return fig
