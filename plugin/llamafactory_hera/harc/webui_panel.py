"""HARC's LlamaBoard panel (texts in ``panel_texts.yaml``). Keys without a field (``harc_extract_harmful``,
``harc_extract_harmless``, ``harc_response_tokens``, ``harc_refresh_beta``, ``harc_max_length``,
``harc_extract_batch_size``, ``harc_eval_max_new_tokens``, ``harc_save_on_signal``, ``harc_watchdog_timeout``) go into
"Extra arguments". See docs/harc.md, "LlamaBoard"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llamafactory_hera.board.builder import build_panel
from llamafactory_hera.board.panel_checks import local_text_depth
from llamafactory_hera.board.spec import Field, LossPlot, PanelDeclaration, row
from llamafactory_hera.harc.config import ROLE_KEYS, HarcArguments, parse_harc_arguments
from llamafactory_hera.harc.layers import eligible_layers
from llamafactory_hera.plots.training import TrainingPlot

# HARC's terms in trainer_log.jsonl (harc.config.LOG_KEYS), on the loss plot's second axis
TERMS = ("harc_ce", "harc_kl", "harc_couple", "harc_couple_resp")


def check_band_depth(args: HarcArguments, context: Mapping[str, Any]) -> str:
    """The error if ``harc_band`` leaves too few layers of LlamaBoard's model; "" if not or if the depth is unknown."""
    depth = local_text_depth(context.get("model_path"))
    if depth is None:
        return ""

    eligible = eligible_layers(depth, args.harc_band)
    if len(eligible) >= args.harc_layers_final:
        return ""
    return (
        f"harc_band: {args.harc_band} leaves {len(eligible)} of the {depth} decoder layers of "
        f"{context.get('model_path')} to couple, fewer than harc_layers_final: {args.harc_layers_final}. Lower "
        "harc_band or harc_layers_final."
    )


FIELDS = (
    *(Field(key, 0, default=key) for key in ROLE_KEYS),  # `harc-data` writes each role under its key's name
    *row(1, "harc_batch_harmful", "harc_batch_harmless", "harc_batch_pseudo", "harc_margin"),
    *row(2, "harc_weight_couple", "harc_weight_couple_resp", "harc_weight_kl", "harc_weight_ce"),
    *row(3, "harc_refresh_steps", "harc_layers", "harc_layers_final", "harc_layers_ramp_step", "harc_band"),
    *row(4, "harc_extract_samples", "harc_validate_samples", "harc_eval"),
)

PANEL = build_panel(
    PanelDeclaration(
        name="HARC",
        prefix="harc_",
        package=__package__,
        arguments=HarcArguments,
        parse=parse_harc_arguments,
        fields=FIELDS,
        loss_plot=LossPlot(TrainingPlot(TERMS, "HARC terms")),
        dataset_from_panel=True,
        dataset_hint="`llamafactory-hera harc-data --out DIR` writes the four role datasets under their keys' names.",
        checks=(check_band_depth,),
    )
)
