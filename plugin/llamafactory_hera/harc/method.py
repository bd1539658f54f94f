"""HARC's declaration: ``stage: harc`` and its ``harc_*`` keys (see :mod:`llamafactory_hera.methods`).

Imports nothing heavy: everything else is named and imported when first used.
"""

from __future__ import annotations

from llamafactory_hera.anatomy.training_plot import TrainingPlot
from llamafactory_hera.methods import Method

# metrics a HARC run logs every step next to LLaMA-Factory's loss (trainer_log.jsonl, LlamaBoard, the curves)
LOG_KEYS = ("harc_couple", "harc_couple_resp", "harc_kl", "harc_ce", "harc_layers")

METHOD = Method(
    stage="harc",
    label="HARC (harmfulness-refusal coupling)",
    prefix="harc_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.harc.args:parse_harc_arguments",
    check_raw_host_args="llamafactory_hera.harc.host_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.harc.host_checks:validate_host_args",
    run="llamafactory_hera.harc.workflow:run_harc",
    log_keys=LOG_KEYS,
    panel="llamafactory_hera.harc.webui_panel:PANEL",
    add_cli_verbs="llamafactory_hera.harc.convert:add_verbs",
    records=("harc_run.json",),
)

# the run's training.png: the loss and the cross-entropy term (same scale) on the left axis, the coupling and KL
# terms (an order of magnitude smaller) on the right one
TRAINING_PLOT = TrainingPlot(terms=("harc_couple", "harc_couple_resp", "harc_kl"), losses=("loss", "harc_ce"),
                             terms_label="HARC coupling and KL terms")
