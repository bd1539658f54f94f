"""RAH-LoRA's declaration: ``stage: rah`` and its ``rah_*`` keys (see :mod:`llamafactory_hera.methods`).

Imports nothing heavy: everything else is named and imported when first used.
"""

from __future__ import annotations

from llamafactory_hera.methods import Method

METHOD = Method(
    stage="rah",
    label="RAH-LoRA (training-free head calibration)",
    prefix="rah_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.rah.args:parse_rah_arguments",
    check_raw_host_args="llamafactory_hera.rah.host_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.rah.host_checks:validate_host_args",
    run="llamafactory_hera.rah.workflow:run_rah",
    log_keys=(),
    panel="llamafactory_hera.rah.webui_panel:PANEL",
    records=("rah_profile.json",),
)
