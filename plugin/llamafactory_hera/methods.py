"""The methods this plugin brings to LLaMA-Factory: the registry, above the methods' packages (none of which imports
it). The start-up hook registers :func:`declared_methods` with :mod:`llamafactory_hera.runtime.registry`; the patches
make each declaration (:class:`~llamafactory_hera.recipe.declaration.Method`) a stage, an argument set and a LlamaBoard
panel, and ``llamafactory-hera`` takes its verbs from it, so adding a method touches no patch. Declarations import only
each method's ``config``; the heavy parts are ``"module:attribute"`` strings.
"""

from __future__ import annotations

import functools

from llamafactory_hera.harc import config as harc
from llamafactory_hera.hera import config as hera
from llamafactory_hera.recipe.declaration import Method

PLAN = "llamafactory_hera.plan.cli:board_report"  # every method's run planned alike

HERA = Method(
    stage="hera",
    label="HeRA (Head-wise Representation Alignment)",
    prefix="hera_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.hera.config:parse_hera_arguments",
    check_raw_host_args="llamafactory_hera.hera.raw_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.hera.parsed_checks:validate_host_args",
    run="llamafactory_hera.hera.workflow:run_hera",
    log_keys=hera.LOG_KEYS,
    panel="llamafactory_hera.hera.webui_panel:PANEL",
    plan=PLAN,
    add_cli_verbs="llamafactory_hera.hera.cli:add_verbs",
    records=("hera_run.json",),
)

RAH = Method(
    stage="rah",
    label="RAH-LoRA (training-free head calibration)",
    prefix="rah_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.rah.config:parse_rah_arguments",
    check_raw_host_args="llamafactory_hera.rah.raw_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.rah.parsed_checks:validate_host_args",
    run="llamafactory_hera.rah.workflow:run_rah",
    log_keys=(),
    panel="llamafactory_hera.rah.webui_panel:PANEL",
    plan=PLAN,
    records=("rah_profile.json",),
    one_process=True,
)

HARC = Method(
    stage="harc",
    label="HARC (harmfulness-refusal coupling)",
    prefix="harc_",
    host_stage="sft",
    parse_arguments="llamafactory_hera.harc.config:parse_harc_arguments",
    check_raw_host_args="llamafactory_hera.harc.raw_checks:validate_raw_host_args",
    check_host_args="llamafactory_hera.harc.parsed_checks:validate_host_args",
    run="llamafactory_hera.harc.workflow:run_harc",
    log_keys=harc.LOG_KEYS,
    panel="llamafactory_hera.harc.webui_panel:PANEL",
    plan=PLAN,
    add_cli_verbs="llamafactory_hera.harc.convert:add_verbs",
    records=("harc_run.json",),
)

# every declared method, in the order the web UI lists them
DECLARATIONS: tuple[Method, ...] = (HERA, RAH, HARC)


@functools.cache
def declared_methods() -> tuple[Method, ...]:
    """Every declared method, checked once: no two share a stage or a key prefix."""
    stages = [method.stage for method in DECLARATIONS]
    prefixes = [method.prefix for method in DECLARATIONS]
    if len(set(stages)) != len(stages) or len(set(prefixes)) != len(prefixes):
        raise RuntimeError(
            f"llamafactory-hera: two declared methods share a stage or a key prefix: {stages}, {prefixes}"
        )
    return DECLARATIONS
