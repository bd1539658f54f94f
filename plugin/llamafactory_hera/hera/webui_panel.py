"""LlamaBoard's HeRA panel, declared: fields, the ``hera_heads`` check, the loss plot."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamafactory_hera.board.builder import build_panel
from llamafactory_hera.board.panel_checks import local_attention_geometry
from llamafactory_hera.board.spec import Field, LossPlot, PanelDeclaration, row
from llamafactory_hera.board.widgets import comma_list
from llamafactory_hera.heads.geometry import check_heads_fit
from llamafactory_hera.hera.config import ALIGNMENT_PANEL, AUTO, HeraArguments, parse_hera_arguments
from llamafactory_hera.plots.training import TrainingPlot


def normalize_heads(value: Any) -> str:
    """The heads box as a recipe value: ``auto`` or ``L1H0,L1H2`` (safe on a command line)."""
    text = str(value if value is not None else "").strip()
    return AUTO if text.lower() == AUTO else comma_list(text)


def check_heads_geometry(args: HeraArguments, context: Mapping[str, Any]) -> str:
    """The run's own heads check against LlamaBoard's model when its config is local; "" when they fit."""
    if args.auto_heads:
        return ""
    geometry = local_attention_geometry(context.get("model_path"))
    if geometry is None:
        return ""
    try:
        check_heads_fit(args.hera_heads, geometry, str(context.get("model_path")).strip())
    except ValueError as err:
        return str(err)
    return ""


AUTO_ONLY = ("hera_heads", AUTO)  # hera_select_* keys are sent only with hera_heads: auto
FIELDS = (
    # the recipe key is required; the panel starts with auto
    Field("hera_heads", 0, scale=2, default=AUTO, normalize=normalize_heads),
    Field("hera_teacher", 0, scale=2),
    *row(0, "hera_k", "hera_lambda", "hera_temperature"),
    *row(1, "hera_pooling", "hera_similarity", "hera_teacher_feature", "hera_learn_temperature"),
    *row(
        2,
        "hera_select_samples",
        "hera_select_num_heads",
        "hera_select_strategy",
        "hera_select_mode",
        "hera_select_batch_size",
        only_with=AUTO_ONLY,
    ),
)

PANEL = build_panel(
    PanelDeclaration(
        name="HeRA",
        prefix="hera_",
        package=__package__,
        arguments=HeraArguments,
        parse=parse_hera_arguments,
        fields=FIELDS,
        checks=(check_heads_geometry,),
        # hera_loss beside the loss; the alignment monitor's MKNN beside them when logged
        loss_plot=LossPlot(TrainingPlot(("hera_loss",), "hera_loss", (ALIGNMENT_PANEL,))),
    )
)
