"""RAH-LoRA's LlamaBoard panel, declared (docs/rah.md, "LlamaBoard"): fields, the ``rah_layers`` check against the
model's depth, and the calibration's progress in place of the loss plot.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import matplotlib.pyplot as plt

from llamafactory_hera.board.builder import build_panel
from llamafactory_hera.board.panel_checks import local_text_depth
from llamafactory_hera.board.spec import Field, LossPlot, PanelDeclaration, row
from llamafactory_hera.board.widgets import comma_list
from llamafactory_hera.rah.config import AUTO, RahArguments, parse_rah_arguments
from llamafactory_hera.runtime.log import PHASE_KEY

# Train-tab arguments that only matter to an optimizer
OPTIMIZER_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "max_grad_norm",
    "warmup_steps",
)


def normalize_layers(value: Any) -> Any:
    """The layers box as one recipe string without spaces: ``auto``, ``0-15`` or ``0,2,4`` (from ``[0, 2 4]``)."""
    if not isinstance(value, str):
        return value
    text = value.strip().strip("[]() ")
    if text.lower() == "auto" or re.fullmatch(r"\d+\s*-\s*\d+", text):
        return re.sub(r"\s+", "", text.lower())
    return comma_list(text)


def check_layers_depth(args: RahArguments, context: Mapping[str, Any]) -> str:
    """The error if ``rah_layers`` exceeds the depth of LlamaBoard's model; "" if not or unreadable."""
    if args.rah_layers == AUTO:
        return ""
    depth = local_text_depth(context.get("model_path"))
    layers = list(args.rah_layers)
    if depth is None or max(layers) < depth:
        return ""
    given = (
        f"{layers[0]}-{layers[-1]}"
        if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2
        else ",".join(map(str, layers))
    )
    return (
        f"rah_layers: {given} goes beyond {context.get('model_path')}, which has {depth} decoder layers "
        f"(num_hidden_layers of its text config; zero-based 0..{depth - 1}). Use auto or layers within "
        f"0-{depth - 1}."
    )


def progress_figure(trainer_log: list[dict[str, Any]], smooth: Any = None) -> Any:
    """In place of the loss plot: each calibration phase's percent done, in run order."""
    plt.close("all")
    plt.switch_backend("agg")
    done: dict[str, float] = {}
    for log in trainer_log:
        if PHASE_KEY in log:
            done[log[PHASE_KEY]] = float(log.get("percentage", 0.0))
    fig = plt.figure(figsize=(6.4, 1.2 + 0.5 * len(done)))
    ax = fig.add_subplot(111)
    phases = list(done)[::-1]
    ax.barh(phases, [done[p] for p in phases], color="#2ca02c")
    ax.set_xlim(0, 100)
    ax.set_xlabel("% done")
    ax.set_title("RAH-LoRA calibration (training-free: no loss)", fontsize="small")
    fig.tight_layout()
    return fig


FIELDS = (
    Field("rah_layers", 0, scale=2, normalize=normalize_layers),
    *row(0, "rah_isal_percentile", "rah_caf_percentile", "rah_num_anchors", "rah_rank"),
    *row(1, "rah_delta", "rah_alpha_max", "rah_samples", "rah_probe_samples", "rah_kl_samples"),
    *row(2, "rah_update", "rah_caf_form", "rah_isal_pairs"),
)

PANEL = build_panel(
    PanelDeclaration(
        name="RAH-LoRA",
        prefix="rah_",
        package=__package__,
        arguments=RahArguments,
        parse=parse_rah_arguments,
        fields=FIELDS,
        loss_plot=LossPlot(marker=PHASE_KEY, figure=progress_figure),
        unused_host_keys=OPTIMIZER_KEYS,
        checks=(check_layers_depth,),
    )
)
