"""HeRA's declaration: ``stage: hera``, its ``hera_*`` keys, its run, panel and verbs.

See :mod:`llamafactory_hera.methods` for what each field means.

Imports nothing heavy: everything else is named and imported when first used.
"""

from __future__ import annotations

from llamafactory_hera.anatomy.training_plot import Panel, TrainingPlot
from llamafactory_hera.methods import Method

# metrics a HeRA run logs next to LLaMA-Factory's (trainer_log.jsonl, LlamaBoard, the curves)
# ("hera_mknn/": every per-head key of the alignment monitor, hera_mknn/L<l>H<h>)
LOG_KEYS = ("lm_loss", "hera_loss", "hera_weighted_loss", "hera_temperature", "hera_image_samples",
            "hera_text_only_samples", "hera_batches_without_term", "hera_nonfinite_skipped", "hera_queue_size",
            "hera_mknn", "hera_mknn/", "hera_mknn_control")

METHOD = Method(
    stage="hera",
    label="HeRA (Head-wise Representation Alignment)",
    prefix="hera_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.hera.args:parse_hera_arguments",
    check_raw_host_args="llamafactory_hera.hera.host_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.hera.host_checks:validate_host_args",
    run="llamafactory_hera.hera.workflow:run_hera",
    log_keys=LOG_KEYS,
    panel="llamafactory_hera.hera.webui_panel:PANEL",
    add_cli_verbs="llamafactory_hera.hera.cli:add_verbs",
    records=("hera_run.json",),
)

# the alignment monitor's series (aligned heads' mean MKNN, the control heads' mean, one faint line per head) when
# the run logged them, in training.png and in LlamaBoard's loss plot (webui_panel)
ALIGNMENT_PANEL = Panel("alignment with the teacher (MKNN)", "MKNN", ("hera_mknn", "hera_mknn_control"),
                        labels={"hera_mknn": "aligned heads (mean)", "hera_mknn_control": "control heads (mean)",
                                "hera_mknn/": "each aligned head"},
                        prefix="hera_mknn/", ylim=(0.0, 1.0))
# the run's training.png: the HeRA term beside the losses, the learned temperature, the alignment panel
TRAINING_PLOT = TrainingPlot(
    terms=("hera_loss",), terms_label="HeRA loss (InfoNCE)", losses=("loss", "lm_loss"),
    panels=(Panel("learned temperature", "temperature (tau)", ("hera_temperature",)), ALIGNMENT_PANEL))
